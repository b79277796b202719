"""Every other built-in family, served: the tiny random checkpoints of tests/test_vllm.py (a Llama with
Math-Shepherd's tag; Qwen2 with Skywork's value head or Qwen2.5-Math-PRM's score head; a TRL token
classifier) each behind a real `vllm serve --runner pooling`, started as `serve_command` writes it
(a checkpoint holding a head gets `--hf-overrides` to `Ttc<Arch>`, which ttc_mlops's vLLM plugin
registers in the server), score as in-process vLLM and transformers.

    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m vllm tests/test_served_prm_families.py -s

One server start per family (tests/test_served_prm.py has the embedded model's, rlhflow).
"""

import json

import pytest
from conftest import free_port
from test_served_prm import KEY, agree, start, stop
from test_vllm import family_checkpoints  # noqa: F401

from ttc_mlops.config import Recipe
from ttc_mlops.prm import remote


def _prm(path, family, **kw):
    from ttc_mlops.prm import load_prm

    return load_prm(Recipe(prm_path=str(path), prm_family=family, dtype="float32", device="cpu", prm_batch_size=4,
                           **kw).prm_settings)


# what each checkpoint is served as: None, as it is (a plain causal LM)
SERVED_AS = {"math_shepherd": None, "skywork": "TtcQwen2ForCausalLM", "qwen_math_prm": "TtcQwen2ForCausalLM",
             "trl": "TtcQwen2ForCausalLM"}


@pytest.mark.vllm
@pytest.mark.server
@pytest.mark.parametrize("family", list(SERVED_AS))
def test_every_family_served_scores_as_in_process(family, family_checkpoints, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("vllm")
    path = family_checkpoints[family]
    cmd = remote.serve_command(str(path), free_port())
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1]) if "--hf-overrides" in cmd else None
    assert overrides == (SERVED_AS[family] and {"architectures": [SERVED_AS[family]]})
    proc, url = start(str(path), free_port(), tmp_path / "serve.log")
    try:
        monkeypatch.setenv("VLLM_API_KEY", KEY)
        served = _prm(path, family, prm_base_url=url)
        assert isinstance(served.forward, remote.RemoteForward)
        worst = agree(served, {"vllm": _prm(path, family, prm_backend="vllm"),
                               "transformers": _prm(path, family, prm_backend="transformers")})
        print(f"{family} (tiny, float32): largest |served - in-process vLLM| {worst['vllm']:.2e}, "
              f"|served - transformers| {worst['transformers']:.2e}")
    finally:
        stop(proc)
