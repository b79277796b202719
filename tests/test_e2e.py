"""The README's main job, for real: `mlflow run` with the embedded SmolLM2 against a temporary store."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e


def test_best_of_n_entry_point_with_the_embedded_model(mlflow_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "HF_TOKEN": "hf_secret_never_logged"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "best_of_n", "--env-manager", "local",
           "--experiment-name", "e2e", "-P", "set=num_samples=2 n=2 max_tokens=48"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy (selected)" in done.stdout

    from ttc_mlops import names as N
    from ttc_mlops.pipeline import model, store

    c = store.client()
    exp = c.get_experiment_by_name("e2e")
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(N.TAG_ROLE) == "parent")
    chunk = next(r for r in runs if r.data.tags.get(N.TAG_ROLE) == "chunk")
    assert chunk.data.tags[N.TAG_PARENT] == parent.info.run_id
    assert parent.data.tags[N.TAG_MODEL] == "embedded:SmolLM2-135M-Instruct"
    assert chunk.data.params["n"] == "2" and chunk.data.params["max_tokens"] == "48"
    assert chunk.data.metrics[N.M_PROBLEMS] == 2
    assert chunk.data.metrics[N.M_COMPLETION_TOKENS] > 0
    assert 0.0 <= chunk.data.metrics[N.M_ACC_SELECTED] <= 1.0
    records = store.load_records(chunk.info.run_id, N.chunk_artifact(0, 2))
    assert len(records) == 2
    for r in records:
        assert len(r.completions) == 2 and all(0 <= s <= 1 for steps in r.step_scores for s in steps)
        assert all(t is not None and 0 < t <= 48 for t in r.completion_tokens)
    artifacts = {a.path for a in c.list_artifacts(chunk.info.run_id)}
    assert N.RECIPE_ARTIFACT in artifacts
    # secrets in the environment never reach params or tags
    assert not any("hf_secret" in v for v in {**chunk.data.params, **chunk.data.tags}.values())
    # the whole set ran in one process, so the job ends merged, evaluated (step = n) and registered
    assert sorted(m.step for m in c.get_metric_history(parent.info.run_id, N.M_ACC_WEIGHTED)) == [1, 2]
    assert c.get_run(parent.info.run_id).data.tags[N.TAG_MERGED] == "complete"
    assert model.model_version_by_alias("ttc-SmolLM2-135M-Instruct-best_of_n").run_id == parent.info.run_id
