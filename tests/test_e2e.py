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

    from ttc_mlops import names
    from ttc_mlops.pipeline import store

    c = store.client()
    exp = c.get_experiment_by_name("e2e")
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(names.TAG_ROLE) == "parent")
    chunk = next(r for r in runs if r.data.tags.get(names.TAG_ROLE) == "chunk")
    assert chunk.data.tags[names.TAG_PARENT] == parent.info.run_id
    assert parent.data.tags[names.TAG_MODEL] == "embedded:SmolLM2-135M-Instruct"
    assert chunk.data.params["n"] == "2" and chunk.data.params["max_tokens"] == "48"
    assert chunk.data.metrics[names.M_PROBLEMS] == 2
    assert chunk.data.metrics[names.M_COMPLETION_TOKENS] > 0
    assert 0.0 <= chunk.data.metrics[names.M_ACC_SELECTED] <= 1.0
    records = store.load_records(chunk.info.run_id, names.chunk_artifact(0, 2))
    assert len(records) == 2
    for r in records:
        assert len(r.completions) == 2 and all(0 <= s <= 1 for steps in r.step_scores for s in steps)
        assert all(t is not None and 0 < t <= 48 for t in r.completion_tokens)
    artifacts = {a.path for a in c.list_artifacts(chunk.info.run_id)}
    assert names.RECIPE_ARTIFACT in artifacts
    # secrets in the environment never reach params or tags
    assert not any("hf_secret" in v for v in {**chunk.data.params, **chunk.data.tags}.values())
    # the whole set ran in one process, so the job ends merged, evaluated (step = n) and registered
    assert sorted(m.step for m in c.get_metric_history(parent.info.run_id, names.M_ACC_WEIGHTED)) == [1, 2]
    assert c.get_run(parent.info.run_id).data.tags[names.TAG_MERGED] == "complete"
    [version] = c.search_model_versions("name = 'ttc-SmolLM2-135M-Instruct-best_of_n'")
    assert version.run_id == parent.info.run_id


def test_the_readme_main_job_verbatim_lands_in_the_recipes_experiment(mlflow_store, tmp_path):
    """`mlflow run . -e best_of_n --env-manager local`, nothing more: the parent and its chunk go to
    the recipe's experiment (ttc-embedded), MLflow's own run in Default points to them, every `ttc`
    command that takes the recipe finds them, and the demo shows accuracy rising with N."""
    from typer.testing import CliRunner

    from ttc_mlops import names
    from ttc_mlops.cli import app
    from ttc_mlops.pipeline import store

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "best_of_n", "--env-manager", "local"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Downloading artifacts" not in done.stdout + done.stderr  # a clean summary

    c = store.client()
    recipe_exp = c.get_experiment_by_name("ttc-embedded")
    runs = c.search_runs([recipe_exp.experiment_id])
    roles = sorted(r.data.tags.get(names.TAG_ROLE) for r in runs)
    assert roles == ["chunk", "parent"]
    parent = next(r for r in runs if r.data.tags[names.TAG_ROLE] == "parent")
    [pointer] = c.search_runs([c.get_experiment_by_name("Default").experiment_id])
    assert pointer.data.tags[names.TAG_ROLE] == names.ROLE_LAUNCHER and pointer.data.tags[names.TAG_POINTS_TO] == parent.info.run_id
    # a best-of-N parent shows what best-of-N reads, not beam settings
    assert "n" in parent.data.params and "beam_width" not in parent.data.params
    # the demo's point: pass@n and the weighted vote rise with n
    history = {m: {x.step: x.value for x in c.get_metric_history(parent.info.run_id, m)} for m in ("pass", "acc_weighted")}
    assert history["pass"][16] > history["pass"][1] and history["acc_weighted"][16] > history["acc_weighted"][1]
    # the commands that take the recipe find the run
    recipe = str(REPO / "recipes" / "SmolLM2-135M-Instruct" / "best_of_n.yaml")
    out = CliRunner().invoke(app, ["evaluate", recipe])
    assert out.exit_code == 0 and parent.info.run_id in out.output, out.output
    out = CliRunner().invoke(app, ["compare", "--experiment", "ttc-embedded", "--output", str(tmp_path / "c.png")])
    assert out.exit_code == 0 and "best_of_n" in out.output, out.output
    # and the per-problem views are there for the UI
    files = {a.path for a in c.list_artifacts(parent.info.run_id, names.EVAL_DIR)}
    assert names.EVAL_PROBLEMS in files and f"{names.EVAL_DIR}/search-0000-0007.html" in files
