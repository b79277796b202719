"""The pipeline against a real `mlflow server` on 127.0.0.1 (started here on a free port, stopped
after): chunk runs, then the MLproject entry points `merge` and `evaluate`, then the registry."""

import os
import subprocess
import sys

import pytest
from conftest import REPO
from fakes import FakePolicy, FakePRM

from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline.run_chunk import run_chunk

pytestmark = pytest.mark.server

PROBLEMS = builtin_problems()[:4]
SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.8]"] for p in PROBLEMS}  # always right


def mlflow_run(entry: str, *params: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
           "--experiment-name", "srv", *[x for p in params for x in ("-P", p)]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def test_chunks_merge_and_evaluate_entry_points_against_a_server(mlflow_server):
    import mlflow.pyfunc

    from ttc_mlops import names
    from ttc_mlops.pipeline import store

    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET, num_samples=4,
               n=4, experiment_name="srv")
    pid = run_chunk(r.model_copy(update={"chunk": 0, "num_chunks": 2}), FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
    c = store.client()

    done = mlflow_run("merge", f"parent_run_id={pid}", "allow_partial=true")  # rows 2:4 are missing
    assert done.returncode == 0, done.stderr[-3000:]
    assert "missing 2 problem(s) of rows 2:4 (no chunk run)" in done.stdout
    assert c.get_run(pid).data.tags[names.TAG_MERGED] == "partial"

    run_chunk(r.model_copy(update={"chunk": 1, "num_chunks": 2}), FakePolicy(SCRIPT), FakePRM(), progress=False)
    for entry in ("merge", "evaluate"):
        done = mlflow_run(entry, f"parent_run_id={pid}")
        assert done.returncode == 0, done.stderr[-3000:]
    parent = c.get_run(pid)
    assert parent.data.tags[names.TAG_MERGED] == "complete"
    assert sorted(m.step for m in c.get_metric_history(pid, "acc_weighted")) == [1, 2, 4]
    assert parent.data.metrics["acc_weighted"] == 1.0
    # the entry points' own runs nest under the parent they worked on
    steps = c.search_runs([parent.info.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_STEP}'")
    assert len(steps) == 3 and all(s.data.tags[names.TAG_PARENT] == pid for s in steps)
    assert sorted(s.data.tags[names.TAG_RUN_NAME].split(":")[0] for s in steps) == ["evaluate", "merge", "merge"]

    version = store.client().get_model_version_by_alias("ttc-SmolLM2-135M-Instruct-best_of_n", names.BEST_ALIAS)
    assert version.run_id == pid and float(version.tags["acc_weighted"]) == 1.0
    model = mlflow.pyfunc.load_model("models:/ttc-SmolLM2-135M-Instruct-best_of_n@best")  # the policy loads on predict
    assert model.metadata.get_input_schema().input_names() == ["problem"]
