"""scripts/gpu_smoke.py around the model call: random-weight policies run fixed-length steps,
through the backend's stream where it has one, and the peak rate it reports fractions of."""

import importlib.util

from conftest import REPO
from fakes import FakePolicy, StreamingPolicy

from ttc_mlops.config import Recipe
from ttc_mlops.data import Problem
from ttc_mlops.policy import Sampling, Streaming, Waves, open_stream

SCRIPT_STEPS = {"1+1?": ["Add one and one.\n\nSo \\boxed{2}"], "2+2?": ["Two twos.\n\nSo \\boxed{4}"]}


def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixed_steps_keep_the_backend_stream_and_rewrite_steps():
    gpu_smoke = smoke()
    fixed = gpu_smoke.FixedSteps(StreamingPolicy(SCRIPT_STEPS), tokens=2)
    assert isinstance(fixed, Streaming) and not isinstance(gpu_smoke.FixedSteps(FakePolicy(SCRIPT_STEPS), 2), Streaming)
    assert isinstance(open_stream(gpu_smoke.FixedSteps(FakePolicy(SCRIPT_STEPS), 2)), Waves)
    stream = fixed.stream()
    prompt = fixed.chat_prompt("", "1+1?")
    step = stream.add([prompt, prompt], Sampling(max_tokens=50, stop=("\n\n",)), [1, 2])
    whole = stream.add([prompt], Sampling(max_tokens=50), [3])
    got = {}
    while stream.busy():
        got.update(stream.collect())
    for t in step:  # a step: the backend ran `tokens` tokens without stop strings; reported as a step
        assert got[t].finish_reason == "stop" and got[t].text.endswith("\n\n") and got[t].num_tokens <= 2
    assert got[whole[0]] == FakePolicy(SCRIPT_STEPS).generate([prompt], Sampling(max_tokens=50), [3])[0]
    assert fixed.prompt_tokens == 0 and fixed.params is None  # the backend's counters show through


def test_peak_rate_is_one_batched_call_of_problems_by_n_rows():
    gpu_smoke = smoke()
    policy = FakePolicy(SCRIPT_STEPS)
    rate = gpu_smoke.peak_rate(policy, Recipe(n=4), [Problem("a", "1+1?", "2"), Problem("b", "2+2?", "4")], 16)
    assert rate > 0
    assert [len(c) for c in policy.calls] == [8, 8]  # a warm-up call, then the measured one


def test_both_prm_backends_where_vllm_can_run_and_transformers_alone_where_it_cannot(monkeypatch):
    """Item 7 of issue 28: the vLLM PRM path is measured where vLLM runs; where it does not, the
    random-weight transformers measurements stay what they were (one PRM backend, transformers)."""
    from ttc_mlops.policy import vllm as vllm_backend

    gpu_smoke = smoke()
    recipe = Recipe()
    monkeypatch.setattr(vllm_backend, "installed_build", lambda: None)
    assert gpu_smoke.prm_backends("both", recipe) == ["transformers"]
    monkeypatch.setattr(vllm_backend, "installed_build", lambda: "cpu")
    assert gpu_smoke.prm_backends("both", recipe) == ["vllm", "transformers"]
    assert gpu_smoke.prm_backends("both", recipe.model_copy(update={"device": "cuda"})) == ["transformers"]
    for one in ("vllm", "transformers", "auto"):  # a backend asked for by name is measured alone
        assert gpu_smoke.prm_backends(one, recipe) == [one]
