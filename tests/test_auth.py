"""An authenticated tracking server (MLflow's basic-auth app) on 127.0.0.1: writes without
credentials are refused; the README's chunk -> merge -> evaluate flow works with them, and the
password reaches no param, tag or artifact.

    python -m pytest -q -m server tests/test_auth.py
"""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import serving
from fakes import FakePolicy, FakePRM

from ttc_mlops import names
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline.run_chunk import run_chunk

pytestmark = pytest.mark.server

PASSWORD = "correct-horse-battery-staple-42"
PROBLEMS = builtin_problems()[:4]
SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.8]"] for p in PROBLEMS}


def request(uri: str, path: str, body: dict, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(f"{uri}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def auth_server(tmp_path, monkeypatch):
    config = tmp_path / "auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/auth.db\n"
                      f"admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret"}
    with serving(tmp_path, monkeypatch, ("--app-name", "basic-auth"), env) as uri:
        yield uri


def test_writes_need_credentials_and_the_flow_works_with_them(auth_server, monkeypatch):
    create = "/api/2.0/mlflow/experiments/create"
    assert request(auth_server, create, {"name": "intruder"}) == 401
    assert request(auth_server, create, {"name": "intruder"}, "admin", "wrong password") == 401

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET, num_samples=4, n=2,
               experiment_name="auth")
    pid = run_chunk(r, FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
    for step in ("merge", "evaluate"):
        done = subprocess.run([sys.executable, "-m", "ttc_mlops.cli", step, "--parent-run-id", pid],
                              capture_output=True, text=True, timeout=300, env=os.environ.copy())
        assert done.returncode == 0, done.stderr[-2000:]
        assert PASSWORD not in done.stdout + done.stderr

    from ttc_mlops.pipeline import store

    c = store.client()
    assert c.get_run(pid).data.metrics[names.M_ACC_WEIGHTED] == 1.0
    for run in c.search_runs([c.get_experiment_by_name("auth").experiment_id]):
        assert not any(PASSWORD in v for v in {**run.data.params, **run.data.tags}.values())
        assert PASSWORD not in (store.load_run_text(run.info.run_id, names.RECIPE_ARTIFACT) or "")
    assert c.get_experiment_by_name("intruder") is None
