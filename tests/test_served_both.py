"""Issue 24's "done when": `ttc run` with the policy and the PRM both behind real vLLM servers gives
the parent, chunk runs, records and accuracy that the in-process vLLM path gives (float32, same seeds).

    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m vllm tests/test_served_both.py

Two servers of the embedded model, as a user starts them: one for generation (test_served_policy's
`VLLMServer`), one for pooling (test_served_prm's `start`, `vllm serve --runner pooling`).
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, free_port
from test_served_policy import SERVER_KEY, VLLMServer, real
from test_served_prm import KEY as PRM_KEY
from test_served_prm import start, stop
from test_vllm import _same

from ttc_mlops import names
from ttc_mlops.config import EMBEDDED_MODEL

RECIPE = REPO / "recipes/SmolLM2-135M-Instruct/beam_search.yaml"
SETTINGS = ("num_samples=3", "n=4", "beam_width=2", "num_iterations=3", "max_tokens=24", "dtype=float32",
            "trace_problems=0")


@pytest.fixture(scope="module")
def servers(embedded_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    logs = tmp_path_factory.mktemp("served-both")
    policy = VLLMServer(embedded_dir, logs)
    policy.start()
    try:
        prm, prm_url = start(EMBEDDED_MODEL, free_port(), logs / "pooling.log")
    except BaseException:
        policy.stop()
        raise
    yield policy.url, prm_url
    stop(prm)
    policy.stop()


def ttc_run(tmp_path, experiment, *sets):
    env = {**os.environ, "TTC_SERVED_KEY": SERVER_KEY, "VLLM_API_KEY": PRM_KEY}
    cmd = [sys.executable, "-m", "ttc_mlops.cli", "run", str(RECIPE), "--no-progress",
           *[a for s in (*SETTINGS, f"experiment_name={experiment}", *sets) for a in ("--set", s)]]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"metrics on parent run ([0-9a-f]{32})", done.stdout).group(1)


@real
def test_ttc_run_with_a_served_policy_and_a_served_prm_gives_the_in_process_results(servers, mlflow_store, tmp_path):
    from ttc_mlops.pipeline import store

    policy_url, prm_url = servers
    served = ttc_run(tmp_path, "served", "backend=openai", f"policy_base_url={policy_url}",
                     "policy_api_key_env=TTC_SERVED_KEY", f"prm_base_url={prm_url}")
    local = ttc_run(tmp_path, "local", "backend=vllm", "prm_backend=vllm")

    records = {pid: [r.to_dict() for r in store.load_records(pid, names.MERGED_RECORDS)] for pid in (served, local)}
    assert len(records[served]) == 3 and _same(records[served], records[local], 1e-4)
    runs = {pid: store.client().get_run(pid) for pid in (served, local)}
    for key in (names.M_ACC_WEIGHTED, names.M_ACC_NAIVE, names.M_ACC_MAJ, names.M_PASS):
        assert runs[served].data.metrics[key] == runs[local].data.metrics[key], key
    chunks = {pid: store.chunk_runs(pid) for pid in (served, local)}
    assert [len(c) for c in chunks.values()] == [1, 1]
    s, c = chunks[served][0].data, chunks[local][0].data
    assert s.params["policy_base_url"] == policy_url and s.params["prm_base_url"] == prm_url
    # cost: the same FLOPs formula and the same generated tokens, wherever the models ran
    for key in (names.M_GENERATED_TOKENS, names.M_COMPLETION_TOKENS, names.M_POLICY_PARAMS):
        assert s.metrics[key] == c.metrics[key], key
