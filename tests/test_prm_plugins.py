"""PRM families from other packages, through the entry-point group `ttc_mlops.prm_families`: the
example plugin in tests/plugin_example is pip-installed into a temporary directory (the environment is
left as it was) and found, built and run through family_for / prm_class / `ttc validate`.

    python -m pytest -q tests/test_prm_plugins.py
"""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from ttc_mlops.config import Recipe, RecipeError

EXAMPLE = REPO / "tests" / "plugin_example"
BUILTINS = "math_shepherd, qwen_math_prm, rlhflow, skywork, trl"
RECIPE = REPO / "recipes" / "SmolLM2-135M-Instruct" / "beam_search.yaml"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """A directory holding the installed example plugin (`pip install --target`), to put on sys.path."""
    src = tmp_path_factory.mktemp("plugin-src") / "plugin_example"
    shutil.copytree(EXAMPLE, src)  # building writes build/ and *.egg-info beside the sources
    site = tmp_path_factory.mktemp("plugin-site")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(site), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return site


@pytest.fixture
def with_plugin(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))  # importlib.metadata reads sys.path at every lookup
    yield plugin_site
    sys.modules.pop("ttc_prm_example", None)


@pytest.fixture(scope="module")
def probe_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama plus the plugin's `probe.weight` / `probe.bias`."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("probe-prm")
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    state = load_file(out / "model.safetensors")
    torch.manual_seed(5)
    state.update({"probe.weight": torch.randn(1, 32), "probe.bias": torch.tensor([0.2])})
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_a_plugin_family_is_found_built_and_scores(with_plugin, probe_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from ttc_mlops.prm import load_prm
    from ttc_mlops.prm.families import families, family_for, prm_class

    found = families()["linear_probe"]
    assert (found.target, found.dist) == ("ttc_prm_example:LinearProbePRM", "ttc-prm-example")
    assert families()["trl"].dist is None
    assert family_for(str(probe_dir), "linear_probe") == "linear_probe"
    cls = prm_class(str(probe_dir), "linear_probe")
    assert cls.__name__ == "LinearProbePRM" and cls.__module__ == "ttc_prm_example"

    prm = load_prm(Recipe(prm_path=str(probe_dir), prm_family="linear_probe", dtype="float32",
                          device="cpu").prm_settings)
    problem, steps = "What is 2+2?", ["Two plus two.", "It is \\boxed{4}."]
    [[scores]] = prm.score([problem], [["\n\n".join(steps)]])

    # the plugin's own description: problem + "\n", every step + "\n\n", sigmoid(probe(h)) at the blank line
    tok = AutoTokenizer.from_pretrained(probe_dir)
    model = AutoModel.from_pretrained(probe_dir, dtype=torch.float32).eval()
    ids, ends = tok.encode(f"{problem}\n", add_special_tokens=False), []
    for step in steps:
        ids += tok.encode(step, add_special_tokens=False) + tok.encode("\n\n", add_special_tokens=False)
        ends.append(len(ids) - 1)
    with torch.inference_mode():
        hidden = model(torch.tensor([ids])).last_hidden_state[0, ends]
    saved = load_file(probe_dir / "model.safetensors")
    expected = (hidden @ saved["probe.weight"].T + saved["probe.bias"]).squeeze(-1).sigmoid().tolist()
    assert len(expected) == 2 and scores == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_ttc_validate_lists_the_families_it_finds(plugin_site, probe_dir):
    """A fresh `ttc` process sees the installed plugin; without it the family is unknown."""
    cmd = [sys.executable, "-m", "ttc_mlops.cli", "validate", str(RECIPE),
           "--set", f"prm_path={probe_dir}", "--set", "prm_family=linear_probe"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"PRM families: {BUILTINS}, linear_probe (plugin: ttc-prm-example)" in done.stdout
    assert "[linear_probe]" in done.stdout

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "prm_family='linear_probe' is not one of" in done.stderr


def _fake_dist(root, name, entry_points):
    """A package's installed metadata, as pip leaves it: <name>-<version>.dist-info."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ttc_mlops.prm_families]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


def test_builtins_win_a_name_clash_and_a_broken_plugin_is_named(tmp_path, monkeypatch, caplog):
    from ttc_mlops.prm.families import families, prm_class

    _fake_dist(tmp_path, "clashing-prm", {"skywork": "clashing_prm:Mine", "broken": "no_such_module:PRM",
                                          "not_a_prm": "ttc_mlops.config:Recipe"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("WARNING", logger="ttc_mlops.prm.families"):
        found = families()
    assert found["skywork"].dist is None and found["skywork"].target == "ttc_mlops.prm.skywork:SkyworkPRM"
    assert "'skywork' from clashing-prm is ignored: the name is taken by a built-in family" in caplog.text
    assert found["broken"].dist == "clashing-prm"
    with pytest.raises(RecipeError, match=r"prm_family='broken': no_such_module:PRM \(from clashing-prm\) cannot be imported"):
        prm_class("./x", "broken")
    with pytest.raises(RecipeError, match=r"prm_family='not_a_prm': .* is not a PRM class"):
        prm_class("./x", "not_a_prm")
