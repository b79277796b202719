"""vLLM model classes for PRM checkpoints that hold more than their causal LM (a value head, a
classification head): the causal LM of the same architecture, loading only its own weights.

    .venv-vllm/bin/python -c "from ttc_mlops.prm.vllm_models import register; register()"

vLLM refuses a checkpoint tensor its model class has no parameter for (Skywork's `v_head.*`, the
`score.*` of Qwen2.5-Math-PRM and of TRL's token-classification models). The PRM backend reads those
heads itself (ttc_mlops/prm/vllm.py), so vLLM is asked for `Ttc<Arch>` (e.g. `TtcQwen2ForCausalLM`):
vLLM's own `<Arch>` whose `load_weights` skips every tensor outside `model.*` and `lm_head.*`.
The classes are made on first use from whichever architectures vLLM knows, and registered in this
process by `register` (the PRM backend calls it before it starts an engine, which on a CPU runs in
this process; a GPU engine forked from it inherits the registry). `register` is also this package's
vLLM general plugin (pyproject.toml, entry point group `vllm.general_plugins`): vLLM calls it in
every process it starts, server and workers included, so `vllm serve` of such a checkpoint with
`--hf-overrides '{"architectures": ["TtcQwen2ForCausalLM"]}'` finds the class. It registers names
only (vLLM imports a class when a model asks for it) and may be called any number of times.
"""

from __future__ import annotations

PREFIX = "Ttc"
KEPT = ("model.", "lm_head.")  # what a causal LM's own weights are named under


def name_for(architecture: str) -> str:
    return PREFIX + architecture


def register(architecture: str | None = None) -> None:
    """Register `Ttc<architecture>` with vLLM (every causal LM vLLM knows when None: the plugin's
    call). Names only, each once: cheap, and a second call registers nothing."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    archs = [architecture] if architecture else sorted(a for a in known if a.endswith("ForCausalLM")
                                                         and not a.startswith(PREFIX))  # not the Ttc ones
    for arch in archs:
        if name_for(arch) not in known:
            ModelRegistry.register_model(name_for(arch), f"{__name__}:{name_for(arch)}")


def __getattr__(name: str):
    if not name.startswith(PREFIX):
        raise AttributeError(name)
    from vllm import ModelRegistry

    base = ModelRegistry._try_load_model_cls(name[len(PREFIX):])
    if base is None:
        raise AttributeError(f"vLLM has no architecture {name[len(PREFIX):]!r}")

    def load_weights(self, weights):
        return base.load_weights(self, ((n, w) for n, w in weights if n.startswith(KEPT)))

    cls = type(name, (base,), {"load_weights": load_weights, "__module__": __name__})
    globals()[name] = cls
    return cls
