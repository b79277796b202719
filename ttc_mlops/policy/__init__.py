"""The policy: a model that continues prompts, and the backends that run it.

    python -c "from ttc_mlops.policy import Sampling; print(Sampling(max_tokens=64))"

`generate` takes one seed per prompt so that a problem's samples do not depend on which batch or
chunk it landed in. A generation that hit a stop string keeps it (`text` ends with the delimiter)
and reports `finish_reason="stop"`; `"eos"` when the model ended the answer; `"length"` when it ran
out of `max_tokens` (a length stop is not an answer: search keeps the two apart).

A step-level search feeds a backend through a `Stream` (`open_stream`): requests go in whenever a
problem needs them, generations come back as they finish, so that one problem's long step does not
hold up the others. A backend that can take requests while it decodes (vLLM's engine, a server) has its own
`stream()`; any other is driven in waves: every request added since the last wave in one
`generate` call per sampling setting, which is exactly the batched search of one call per
iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 2048  # new tokens per request
    stop: tuple[str, ...] = ()


def check_seeds(prompts: list[str], seeds: list[int]) -> None:
    """A request's seed is its own: one seed per prompt."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")


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


class Stream(Protocol):
    # True: `collect` returns as soon as some requests finish while others still run, so the
    # caller should act on those at once. False: `collect` finishes everything added so far.
    continuous: bool

    def add(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[int]:
        """Queue one request per prompt (the i-th sampled with seeds[i]); returns their tickets."""

    def busy(self) -> int:
        """Requests added and not yet collected."""

    def collect(self) -> list[tuple[int, Generation]]:
        """Run until at least one request has finished (nothing when none is busy); returns the
        finished ones by ticket, each once."""


@runtime_checkable
class Streaming(Protocol):
    def stream(self) -> Stream: ...


class Waves:
    """A `Stream` over any policy's `generate`: `collect` runs every queued request, one call per
    sampling setting in the order the settings were first asked for, requests in the order added."""

    continuous = False

    def __init__(self, policy: Policy):
        self.policy = policy
        self.queue: list[tuple[int, str, Sampling, int]] = []
        self.tickets = 0

    def add(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[int]:
        check_seeds(prompts, seeds)
        start, self.tickets = self.tickets, self.tickets + len(prompts)
        self.queue += [(start + i, p, sampling, s) for i, (p, s) in enumerate(zip(prompts, seeds))]
        return list(range(start, self.tickets))

    def busy(self) -> int:
        return len(self.queue)

    def collect(self) -> list[tuple[int, Generation]]:
        queue, self.queue = self.queue, []
        done: list[tuple[int, Generation]] = []
        for sampling in dict.fromkeys(q[2] for q in queue):
            wave = [q for q in queue if q[2] == sampling]
            gens = self.policy.generate([q[1] for q in wave], sampling, [q[3] for q in wave])
            done += [(q[0], g) for q, g in zip(wave, gens)]
        return done


def open_stream(policy: Policy) -> Stream:
    """The policy's own stream where it has one (continuous feeding), else waves of `generate` calls."""
    return policy.stream() if isinstance(policy, Streaming) else Waves(policy)


def chat_prompt(tokenizer, system: str, user: str) -> str:
    """The chat-template prompt that every backend continues (one place, so backends agree)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_policy(settings) -> Policy:
    """The policy backend of a recipe's `policy_settings` (heavy imports happen here, not at module import)."""
    from ..config import RecipeError

    backend = settings.backend
    if backend == "openai":
        from .openai import OpenAIPolicy

        return OpenAIPolicy(settings)
    if backend in ("auto", "vllm"):
        from . import vllm as vllm_backend

        usable, why = vllm_backend.available(settings)
        if usable:
            return vllm_backend.VLLMPolicy(settings)
        if backend == "vllm":
            raise RecipeError(f"backend='vllm' but vLLM cannot run here: {why}")
    from .hf import HFPolicy

    return HFPolicy(settings)
