"""The policy: a model that continues prompts, and the backends that run it.

    python -c "from ttc_mlops.policy import Sampling; print(Sampling(max_tokens=64))"

`generate` takes one seed per prompt so that a problem's samples do not depend on which batch or
chunk it landed in. A generation that hit a stop string keeps it (`text` ends with the delimiter)
and reports `finish_reason="stop"`; `"eos"` when the model ended the answer; `"length"` when it ran
out of `max_tokens` (a length stop is not an answer: search keeps the two apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

FinishReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 2048  # new tokens per request
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int  # completion tokens
    finish_reason: FinishReason


class Policy(Protocol):
    name: str
    # Called by backends that decode token by token with how many tokens one decoding step sampled
    # (progress within a long call); None where nobody listens. vLLM's backend does not call it.
    progress: Callable[[int], None] | None
    params: int | None  # parameters one token's forward multiplies by (FLOPs ~ 2 x params x tokens); None: unknown
    prompt_tokens: int  # prompt tokens run so far (prefix reuse spares some)
    prompt_tokens_full: int  # every prompt token of every request so far

    def clear_cache(self) -> None:
        """Forget every prefix kept between calls (benchmarks, so that no run profits from another's)."""

    def chat_prompt(self, system: str, user: str) -> str:
        """The prompt text that makes the model answer `user`; an assistant prefix is appended to it."""

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        """One generation per prompt, the i-th sampled with seeds[i]."""


def chat_prompt(tokenizer, system: str, user: str) -> str:
    """The chat-template prompt that every backend continues (one place, so backends agree)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_policy(settings) -> Policy:
    """The policy backend of a recipe's `policy_settings` (heavy imports happen here, not at module import)."""
    from ..config import RecipeError

    backend = settings.backend
    if backend in ("auto", "vllm"):
        from . import vllm as vllm_backend

        usable, why = vllm_backend.available(settings)
        if usable:
            return vllm_backend.VLLMPolicy(settings)
        if backend == "vllm":
            raise RecipeError(f"backend='vllm' but vLLM cannot run here: {why}")
    from .hf import HFPolicy

    return HFPolicy(settings)
