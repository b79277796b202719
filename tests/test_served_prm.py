"""A PRM served by vLLM (`prm_base_url`, ttc_mlops/prm/remote.py): the client's retries and errors
against a stub HTTP server (fast), then a real `vllm serve --runner pooling` of the embedded model.

    python -m pytest -q -p no:cacheprovider tests/test_served_prm.py -m "not slow"
    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m vllm tests/test_served_prm.py -s

The real server is started once for the module (and once more after the test that kills it), on
127.0.0.1, from the interpreter running the tests (it needs vllm), and stopped by its pid.
"""

import base64
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import free_port, wait_healthy
from stub_server import Stub, scripted, stub_fixture

from ttc_mlops import serving
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe, RecipeError, build_recipe
from ttc_mlops.prm import remote

KEY = "served-prm-test-key"


# --- the client against a stub server: retries, errors, decoding (no model, no vllm)

stub = stub_fixture(lambda script: Stub({path: scripted(answers) for path, answers in script.items()}))


def _states_item(states: np.ndarray) -> dict:
    return {"index": 0, "object": "pooling", "data": base64.b64encode(states.astype("<f4").tobytes()).decode()}


MODELS = (200, {"object": "list", "data": [{"id": "org/prm", "root": "/models/prm"}]})


def test_retries_429_and_5xx_with_backoff_then_succeeds(stub, monkeypatch):
    s = stub({"/pooling": [(429, {"error": {"message": "busy"}}), (503, {}), (200, {"data": [_states_item(np.ones((3, 4)))],
                                                                                 "usage": {"prompt_tokens": 3}})]})
    monkeypatch.setenv("TTC_TEST_KEY", "k1")
    client = remote.Client(s.url + "/v1/", "TTC_TEST_KEY", backoff=0.01)
    got = client.request("/pooling", remote.pooling_body("org/prm", [5, 6, 7]))
    assert remote.decode_states(got["data"][0], 4).shape == (3, 4)
    assert len(s.seen) == 3 and all(h.get("Authorization") == "Bearer k1" for _, h, _ in s.seen)
    body = s.seen[-1][2]
    assert body["input"] == [5, 6, 7] and body["task"] == "token_embed" and body["use_activation"] is False


def test_a_5xx_that_persists_fails_in_one_line_naming_url_and_status(stub):
    s = stub({"/pooling": [(500, {"error": {"message": "engine dead\nsee log"}})]})
    client = remote.Client(s.url, "TTC_TEST_KEY", retries=2, backoff=0.01)
    with pytest.raises(remote.PRMServerError) as err:
        client.request("/pooling", {})
    msg = str(err.value)
    assert "\n" not in msg and f"{s.url}/pooling" in msg and "500" in msg and "engine dead see log" in msg
    assert msg.endswith("after 3 tries") and len(s.seen) == 3


def test_a_cut_off_answer_is_retried_then_one_line():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    answered = []

    def serve():  # a body shorter than its Content-Length, then the connection drops
        while True:
            conn, _ = listener.accept()
            request = b""  # the whole request first: closing on unread bytes would reset the connection instead
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), b"0"))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"da")
            conn.close()
            answered.append(1)

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(remote.PRMServerError, match=rf"^PRM server {url}/pooling failed: no answer \(IncompleteRead.*\), after 3 tries$"):
        remote.Client(url, "TTC_TEST_KEY", retries=2, backoff=0.01).request("/pooling", {})
    assert len(answered) == 3
    listener.close()


def test_a_400_is_not_retried(stub):
    s = stub({"/pooling": [(400, {"error": {"message": "prompt too long"}})]})
    with pytest.raises(remote.PRMServerError, match="400 .*prompt too long"):
        remote.Client(s.url, "TTC_TEST_KEY", backoff=0.01).request("/pooling", {})
    assert len(s.seen) == 1


def test_preflight_401_is_one_line_naming_url_status_and_the_variable(stub, monkeypatch):
    s = stub({"/v1/models": [(401, {"error": "Unauthorized"})]})
    monkeypatch.setenv("VLLM_API_KEY", "wrong")
    r = Recipe(prm_path="org/prm", prm_base_url=s.url)
    with pytest.raises(RecipeError) as err:
        remote.check_server(r.prm_settings, hidden_size=4)
    msg = str(err.value)
    assert "\n" not in msg and s.url in msg and "401" in msg and "the key in $VLLM_API_KEY was refused" in msg and "wrong" not in msg


def test_preflight_names_what_the_server_serves_when_not_the_prm(stub):
    s = stub({"/v1/models": [(200, {"data": [{"id": "other/model", "root": "other/model"}]})]})
    with pytest.raises(RecipeError, match=r"serves \['other/model'\], not prm_path='org/prm'"):
        remote.check_server(Recipe(prm_path="org/prm", prm_base_url=s.url).prm_settings, hidden_size=4)


def test_preflight_finds_a_server_not_running_pooling(stub):
    s = stub({"/v1/models": [MODELS],
              "/pooling": [(400, {"error": {"message": "Try switching the model's pooling_task via --pooler-config.task"}})]})
    with pytest.raises(RecipeError, match="pooling_task.*start the server with vllm serve MODEL --runner pooling"):
        remote.check_server(Recipe(prm_path="org/prm", prm_base_url=s.url).prm_settings, hidden_size=4)


def test_preflight_accepts_the_served_root_and_checks_the_hidden_size(stub):
    s = stub({"/v1/models": [(200, {"data": [{"id": "prm", "root": "org/prm"}]})],
              "/pooling": [(200, {"data": [_states_item(np.zeros((2, 4)))], "usage": {"prompt_tokens": 2}})]})
    settings = Recipe(prm_path="org/prm", prm_base_url=s.url).prm_settings
    assert remote.check_server(settings, hidden_size=4) == "prm"
    with pytest.raises(RecipeError, match="not a multiple of hidden_size=3"):
        remote.check_server(settings, hidden_size=3)


def test_an_unreachable_server_fails_preflight_within_seconds():
    port = free_port()  # nothing listens there
    t = time.perf_counter()
    with pytest.raises(RecipeError, match=rf"prm_base_url='http://127.0.0.1:{port}': PRM server .* no answer"):
        remote.check_server(Recipe(prm_path="org/prm", prm_base_url=f"http://127.0.0.1:{port}").prm_settings, 4)
    assert time.perf_counter() - t < serving.CHECK_TIMEOUT_S + 2


def test_recipe_rules_and_search_key():
    base = Recipe(prm_path="org/prm")
    served = Recipe(prm_path="org/prm", prm_base_url="http://host:8001", prm_api_key_env="MY_KEY")
    assert served.search_key == base.search_key  # where the PRM runs, not what it scores
    with pytest.raises(ValueError, match="prm_backend='transformers'"):
        Recipe(prm_base_url="http://host:8001", prm_backend="transformers")
    with pytest.raises(ValueError, match="prm_base_url"):
        Recipe(prm_base_url="host:8001")
    # checked as policy_base_url is: no credentials in the URL, the key field names a variable
    with pytest.raises(RecipeError) as err:
        build_recipe({"prm_base_url": "http://user:sekrit@h:8001"})
    assert "prm_base_url='http://***@h:8001' holds credentials" in str(err.value) and "sekrit" not in str(err.value)
    for bad in ("", "sk-123 key"):
        with pytest.raises(RecipeError) as err:
            build_recipe({"prm_base_url": "http://h:8001", "prm_api_key_env": bad})
        assert "prm_api_key_env is not an environment variable name" in str(err.value)
        assert not bad or bad not in str(err.value)
    assert remote.server_root("http://h:1/v1/") == "http://h:1"


def test_a_family_that_cannot_run_on_vllm_is_refused_naming_family_and_url(monkeypatch):
    from ttc_mlops.prm import families, prm_backend

    class NotOnVLLM:
        vllm = False

        def score(self):
            pass

        def clear_cache(self):
            pass

    monkeypatch.setitem(families.BUILTIN, "probe", "x:y")
    monkeypatch.setattr(families, "prm_class", lambda path, family=None: NotOnVLLM)
    monkeypatch.setattr("ttc_mlops.prm.families.prm_class", lambda path, family=None: NotOnVLLM)
    r = Recipe(prm_path="org/prm", prm_family="probe", prm_base_url="http://h:8001")
    with pytest.raises(RecipeError, match="prm_base_url='http://h:8001': PRM family 'probe' .* does not run on vLLM"):
        prm_backend(r.prm_settings)


# --- a real `vllm serve --runner pooling` of the embedded model (float32)

def start(prm_path: str, port: int, log_path):
    env = {**os.environ, "VLLM_API_KEY": KEY, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0))))}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = remote.serve_command(prm_path, port, host="127.0.0.1", dtype="float32")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log_path, 300, "vllm serve --runner pooling")
    return proc, url


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine-core child
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(embedded_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    log_dir = tmp_path_factory.mktemp("vllm-serve")
    port = free_port()
    proc, url = start(EMBEDDED_MODEL, port, log_dir / "serve.log")
    state = {"proc": proc, "url": url, "port": port, "log": log_dir / "serve.log"}
    yield state
    stop(state["proc"])


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", KEY)


def _prm(**kw):
    from ttc_mlops.prm import load_prm

    return load_prm(Recipe(prm_path=EMBEDDED_MODEL, dtype="float32", device="cpu", prm_batch_size=4, **kw).prm_settings)


def agree(served, others: dict, tol: float = 1e-4) -> dict[str, float]:
    """Three search iterations (a beam grows by a step, its siblings are new): every served step score
    within `tol` of each other backend's; the server runs each new sequence whole and says so; scores
    already computed are not asked for again. Returns the largest difference per backend."""
    from test_vllm import PROBLEM, SIBLINGS, STEPS

    worst = dict.fromkeys(others, 0.0)
    for k in range(1, 4):
        comps = ["".join(STEPS[:k])] + ["".join(STEPS[: k - 1]) + s for s in SIBLINGS]
        full, ran = served.tokens_full, served.tokens_processed
        got = served.score([PROBLEM], [comps])[0]
        for name, other in others.items():
            want = other.score([PROBLEM], [comps])[0]
            assert [len(s) for s in got] == [len(s) for s in want]
            for a, b in zip(got, want):
                assert a == pytest.approx(b, abs=tol)
                worst[name] = max([worst[name]] + [abs(x - y) for x, y in zip(a, b)])
        assert 0 < served.tokens_processed - ran <= served.tokens_full - full  # usage.prompt_tokens, whole sequences
        ran = served.tokens_processed
        assert served.score([PROBLEM], [comps])[0] == got and served.tokens_processed == ran  # the score cache
    return worst


@pytest.mark.vllm
@pytest.mark.server
def test_served_scores_equal_in_process_vllm_and_transformers(server, key):
    served, in_process, hf = _prm(prm_base_url=server["url"]), _prm(prm_backend="vllm"), _prm(prm_backend="transformers")
    assert isinstance(served.forward, remote.RemoteForward) and served.model is None
    assert served.params == in_process.params and served.params is not None  # FLOPs counted the same way
    worst = agree(served, {"vllm": in_process, "transformers": hf})
    print(f"embedded rlhflow, float32: largest |served - in-process vLLM| {worst['vllm']:.2e}, "
          f"|served - transformers| {worst['transformers']:.2e}")


@pytest.mark.vllm
@pytest.mark.server
def test_beam_search_with_a_served_prm_gives_the_in_process_records(server, key):
    from test_vllm import _same

    from ttc_mlops.data import Problem
    from ttc_mlops.policy import load_policy
    from ttc_mlops.strategies import STRATEGIES

    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, approach="beam_search", n=4, beam_width=2,
               num_iterations=3, max_tokens=24, dtype="float32", backend="transformers")
    policy = load_policy(r.policy_settings)
    problems = [Problem(str(i), q, "") for i, q in enumerate(["What is 12 * 13?", "Solve 2x + 3 = 11."])]
    records = {}
    for where, update in (("served", {"prm_base_url": server["url"]}), ("vllm", {"prm_backend": "vllm"})):
        prm = _prm(**update)
        policy.clear_cache()
        records[where] = [x.to_dict() for x in STRATEGIES["beam_search"](problems, policy, prm, r.model_copy(update=update))]
    assert _same(records["served"], records["vllm"], 1e-4)
    assert all(len(x["completions"]) == 4 for x in records["served"])


class KillingPolicy:
    """A scripted policy that kills the PRM server when the search asks for its `at`-th batch."""

    def __init__(self, inner, at: int, kill):
        self.inner, self.at, self.kill, self.calls = inner, at, kill, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, sampling, seeds):
        self.calls += 1
        if self.calls == self.at:
            self.kill()
        return self.inner.generate(prompts, sampling, seeds)


@pytest.mark.vllm
@pytest.mark.server
def test_a_killed_prm_server_fails_the_chunk_and_the_rerun_resumes(server, key, mlflow_store, monkeypatch):
    from chunk_worker import PROBLEMS, SCRIPT
    from fakes import FakePolicy

    from ttc_mlops import names
    from ttc_mlops.pipeline import store
    from ttc_mlops.pipeline.run_chunk import run_chunk

    monkeypatch.setattr(serving, "BACKOFF_S", 0.2)  # 6 s of retries, not 15
    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET, num_samples=len(PROBLEMS),
               n=2, search_batch_size=2, dtype="float32", experiment_name="served-kill", prm_base_url=server["url"])

    def kill():
        os.killpg(server["proc"].pid, signal.SIGKILL)
        server["proc"].wait()

    with pytest.raises(remote.PRMServerError, match=rf"PRM server {server['url']}/pooling failed: no answer .*, after 6 tries"):
        run_chunk(r, KillingPolicy(FakePolicy(SCRIPT), at=3, kill=kill), progress=False)
    exp = store.client().get_experiment_by_name("served-kill")
    [run] = store.client().search_runs([exp.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_CHUNK}'")
    assert run.info.status == "FAILED"
    saved = store.load_records(run.info.run_id, names.chunk_artifact(0, len(PROBLEMS)))
    assert len(saved) == 4  # the two batches scored before the server died

    with pytest.raises(RecipeError, match="no answer"):  # a rerun while it is down stops in preflight
        run_chunk(r, FakePolicy(SCRIPT), progress=False)
    server["proc"], _ = start(EMBEDDED_MODEL, server["port"], server["log"])  # back, at the same address
    result = run_chunk(r, FakePolicy(SCRIPT), progress=False)
    assert result.run_id == run.info.run_id and result.resumed_from == 4 and len(result.records) == len(PROBLEMS)
    assert store.get_run(run.info.run_id).info.status == "FINISHED"
    assert [x.problem_id for x in result.records[:4]] == [x.problem_id for x in saved]
    assert all(0 <= s <= 1 for x in result.records for c in x.step_scores for s in c)
    assert result.metrics[names.M_PRM_TOKENS] > 0


@pytest.mark.vllm
@pytest.mark.server
def test_a_wrong_key_is_one_line_through_ttc_validate(server, tmp_path):
    env = {**os.environ, "VLLM_API_KEY": "not-the-key", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/s.db"}
    (tmp_path / "r.yaml").write_text(f"model_path: {EMBEDDED_MODEL}\nprm_path: {EMBEDDED_MODEL}\n"
                                     f"dataset_name: {BUILTIN_DATASET}\nnum_samples: 2\n")
    done = subprocess.run([sys.executable, "-m", "ttc_mlops.cli", "validate", "r.yaml", "--set",
                           f"prm_base_url={server['url']}"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if "401" in line]
    assert len(lines) == 1 and f"{server['url']}/v1/models failed: 401" in lines[0] and "not-the-key" not in done.stderr
