"""`ttc launch` without a cluster: validation before anything is submitted, the sbatch calls, --only-missing.

    python -m pytest -q tests/test_launch.py

sbatch, squeue and scancel are faked by one small program that records its calls; the tracking
store is the test's SQLite store (the server check is tested on its own), the job scripts are the
real ones, run by bash with a fake `ttc` that records its arguments and environment.
"""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from conftest import REPO
from fakes import FakePolicy, FakePRM
from typer.testing import CliRunner

from ttc_mlops import names
from ttc_mlops.cli import app
from ttc_mlops.config import (
    BUILTIN_DATASET,
    EMBEDDED_MODEL,
    Recipe,
    load_recipe,
    recipe_yaml,
)
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import launch as launch_mod
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.launch import (
    LaunchError,
    array_spec,
    check_store,
    cluster_options,
    launch,
)
from ttc_mlops.pipeline.run_chunk import run_chunk

FAKE_SLURM = """#!{python}
import json, os, sys
tool = os.path.basename(sys.argv[0])
log = os.environ["FAKE_SLURM_LOG"]
calls = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
with open(log, "a") as f:
    f.write(json.dumps({{"tool": tool, "argv": sys.argv[1:], "cluster": os.environ.get("TTC_CLUSTER"),
                        "password": os.environ.get("MLFLOW_TRACKING_PASSWORD")}}) + "\\n")
if tool == "sbatch":
    if os.environ.get("FAKE_SBATCH_FAIL") == str(sum(c["tool"] == "sbatch" for c in calls) + 1):
        sys.exit("sbatch: error: invalid partition specified: nope")
    print(100 + len(calls))
elif tool == "squeue":
    print(os.environ.get("FAKE_SQUEUE", ""))
"""

FAKE_TTC = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_TTC_LOG"
env | grep -E '^(MLFLOW_|_MLFLOW_|OMP_NUM_THREADS)' | sort >> "$FAKE_TTC_LOG"
[[ $1 != merge || -z ${FAKE_MERGE_FAILS:-} ]] || { echo "missing chunks: rows 2:4" >&2; exit 1; }
"""

PROBLEMS = builtin_problems()[:8]
SCRIPT = {p.problem: [f"So \\boxed{{{p.answer}}}[s=0.9]", "So \\boxed{0}[s=0.1]"] for p in PROBLEMS}
runner = CliRunner()


def base_recipe(**kw) -> Recipe:
    return Recipe(**{"model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL, "dataset_name": BUILTIN_DATASET,
                     "num_samples": 8, "n": 2, "search_batch_size": 1, "experiment_name": "launch", **kw})


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """Fake sbatch / squeue / scancel first on PATH; returns a function listing their calls."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue", "scancel"):
        (bin_dir / tool).write_text(FAKE_SLURM.format(python=sys.executable))
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "slurm-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    monkeypatch.delenv("TTC_CLUSTER", raising=False)

    def calls(tool=None):
        found = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [c for c in found if tool is None or c["tool"] == tool]

    return calls


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(base_recipe()))
    return path


@pytest.fixture
def fake_server(mlflow_store, monkeypatch):
    """The test's SQLite store stands in for a server (check_store is tested on its own below)."""
    monkeypatch.setattr(launch_mod, "check_store", lambda uri: None)
    return mlflow_store


def test_bad_chunks_fail_before_anything_is_submitted(slurm, recipe_file, tmp_path):
    for chunks, message in ((0, "--chunks=0 must be at least 1"), (-2, "--chunks=-2 must be at least 1"),
                            (9, "--chunks=9 is larger than the 8 problems of builtin:math-mini \\(num_samples=8\\)")):
        with pytest.raises(LaunchError, match=message):
            launch(str(recipe_file), [], chunks)
    with pytest.raises(LaunchError, match="--max-parallel=0 must be at least 1"):
        launch(str(recipe_file), [], 2, max_parallel=0)
    with pytest.raises(LaunchError, match=r"chunk=0 is set \(by .*recipe.yaml or --set\): `ttc launch` splits the problems itself"):
        launch(str(recipe_file), ["chunk=0", "num_chunks=2"], 2)
    assert slurm() == [] and not (tmp_path / "mlflow.db").exists()


def test_cli_reports_bad_recipe_and_bad_chunks(slurm, recipe_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = runner.invoke(app, ["launch", str(recipe_file), "--chunks", "2", "--set", "n=0", "--set", "temprature=1"])
    assert bad.exit_code == 2 and "unknown key 'temprature'" in bad.output and "n=0" in bad.output
    too_many = runner.invoke(app, ["launch", str(recipe_file), "--chunks", "40"])
    assert too_many.exit_code == 2 and "--chunks=40 is larger than the 8 problems" in too_many.output
    assert slurm() == [] and not (tmp_path / "mlflow.db").exists()


def test_sbatch_not_on_path(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LaunchError, match="sbatch is not on PATH"):
        launch(str(recipe_file), [], 2)


def test_file_stores_are_refused_with_how_to_start_a_server(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\nfiler:/export/home /shared/home nfs4 rw,relatime 0 0\n")
    monkeypatch.setattr(launch_mod, "MOUNTS", str(mounts))
    with pytest.raises(LaunchError) as err:
        check_store("sqlite:////shared/home/me/mlflow.db")
    assert "network filesystem (nfs4 mounted at /shared/home)" in str(err.value)
    assert "mlflow server --app-name basic-auth --backend-store-uri" in str(err.value) and "export MLFLOW_TRACKING_URI=http://" in str(err.value)
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", "file:///scratch/mlruns", "./mlruns"):
        with pytest.raises(LaunchError, match="on this machine's disk .*tasks on other nodes cannot write to it"):
            check_store(uri)
    with pytest.raises(LaunchError, match="scheme 'ftp' is not a store a cluster can share"):
        check_store("ftp://example.org/mlflow")
    check_store("postgresql://mlflow@db.cluster/mlflow")  # server-backed: accepted


def test_tracking_server_must_answer_health(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(LaunchError, match=f"MLFLOW_TRACKING_URI=http://127.0.0.1:{closed} is not reachable"):
        check_store(f"http://127.0.0.1:{closed}")

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_store(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


def test_launch_submits_the_array_then_merge_after_it(slurm, fake_server, recipe_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cluster = tmp_path / "cluster.sh"
    cluster.write_text("CHUNK_SBATCH=(\n  --partition=gpu  # one GPU per task\n  --gres=gpu:1\n)\n"
                       "MERGE_SBATCH=(--partition=cpu)\nttc_env() { :; }\n")
    done = launch(str(recipe_file), ["n=4"], 3, max_parallel=2, sbatch_args=["--qos=high"],
                  merge_sbatch_args=["--mem=4G"], cluster_file=cluster)
    chunk_call, merge_call = slurm("sbatch")
    parent = done.parent_run_id
    assert (done.array_job, done.merge_job, done.chunks) == ("100", "101", [0, 1, 2])
    out = tmp_path / "slurm-logs" / parent
    assert chunk_call["argv"] == [
        "--parsable", f"--job-name=ttc-chunks-{parent[:12]}", "--array=0-2%2", f"--output={out}/%x_%A_%a.out",
        "--partition=gpu", "--gres=gpu:1", "--qos=high",
        str(REPO / "slurm/chunks.sbatch"), str(out / "recipe.yaml"), "3", parent]
    assert merge_call["argv"] == [
        "--parsable", f"--job-name=ttc-merge-{parent[:12]}", "--dependency=afterok:100", "--kill-on-invalid-dep=yes",
        f"--output={out}/%x_%j.out", "--partition=cpu", "--mem=4G", str(REPO / "slurm/merge_evaluate.sbatch"), parent]
    assert chunk_call["cluster"] == str(cluster)  # the job scripts source the same cluster file
    copy = load_recipe(out / "recipe.yaml")  # the tasks' recipe: same search configuration
    assert copy.n == 4 and copy.search_key == base_recipe(n=4).search_key
    run = store.client().get_run(parent)
    assert run.data.tags[names.TAG_ROLE] == "parent" and run.data.tags[names.TAG_SEARCH_KEY] == copy.search_key
    again = launch(str(recipe_file), ["n=4"], 3)  # the same configuration finds the same parent
    assert again.parent_run_id == parent


def test_cli_prints_job_ids_and_how_to_follow(slurm, fake_server, recipe_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["launch", str(recipe_file), "--chunks", "4", "--sbatch-arg", "--qos=low"])
    assert result.exit_code == 0, result.output
    assert "job 100: 4 of 4 chunks of 8 problems" in result.output and "job 101 (after 100 succeeds)" in result.output
    assert "squeue -j 100,101" in result.output and "--chunks 4 --only-missing" in result.output
    assert "?workflowType=machine_learning" in result.output  # the parent's page, in the UI's training view
    assert "--qos=low" in slurm("sbatch")[0]["argv"]


class Dying(FakePolicy):
    def generate(self, prompts, sampling, seeds):
        if self.calls:
            raise KeyboardInterrupt("scancel")
        return super().generate(prompts, sampling, seeds)


@pytest.mark.slow
def test_only_missing_submits_unfinished_chunks(slurm, fake_server, recipe_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in (0, 2):
        run_chunk(base_recipe(chunk=i, num_chunks=4), FakePolicy(SCRIPT), FakePRM(), progress=False)
    with pytest.raises(KeyboardInterrupt):  # chunk 1 dies after its first problem: a RUNNING run with a checkpoint
        run_chunk(base_recipe(chunk=1, num_chunks=4), Dying(SCRIPT), FakePRM(), progress=False)

    monkeypatch.setenv("FAKE_SQUEUE", "3")
    with pytest.raises(LaunchError, match=r"chunks \[3\] of parent .* are still queued or running"):
        launch(str(recipe_file), [], 4, only_missing=True)
    assert slurm("sbatch") == []
    monkeypatch.setenv("FAKE_SQUEUE", "")
    with pytest.raises(LaunchError, match=r"chunk runs for rows \['2:4', '4:6'\], which a split into 3 chunks does not produce"):
        launch(str(recipe_file), [], 3, only_missing=True)

    done = launch(str(recipe_file), [], 4, only_missing=True)
    assert done.chunks == [1, 3] and done.finished_before == [0, 2]
    assert "--array=1,3" in slurm("sbatch")[0]["argv"]
    assert f"--dependency=afterok:{done.array_job}" in slurm("sbatch")[1]["argv"]
    out = runner.invoke(app, ["launch", str(recipe_file), "--chunks", "4", "--only-missing"])
    assert out.exit_code == 0 and "chunks [0, 2]: not submitted" in out.output, out.output

    for i in (1, 3):  # the resubmitted tasks finish; only merge + evaluate is left
        run_chunk(base_recipe(chunk=i, num_chunks=4), FakePolicy(SCRIPT), FakePRM(), progress=False)
    last = launch(str(recipe_file), [], 4, only_missing=True)
    assert last.array_job is None and last.chunks == []
    merge_only = slurm("sbatch")[-1]["argv"]
    assert not any(a.startswith("--dependency") for a in merge_only) and merge_only[-2].endswith("merge_evaluate.sbatch")


def test_failed_merge_submission_cancels_the_array(slurm, fake_server, recipe_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "2")
    with pytest.raises(LaunchError, match="sbatch failed \\(exit 1\\): sbatch: error: invalid partition"):
        launch(str(recipe_file), [], 2)
    assert [c["argv"] for c in slurm("scancel")] == [["100"]]


def test_cluster_file_is_read_as_bash_arrays(tmp_path):
    chunk, merge = cluster_options(REPO / "slurm/cluster.sh")
    assert chunk and all(o.startswith("--") for o in chunk + merge)  # commented lines are not options
    bad = tmp_path / "cluster.sh"
    bad.write_text("CHUNK_SBATCH=(--time=1:00:00)\n")
    with pytest.raises(LaunchError, match="MERGE_SBATCH: unbound variable"):
        cluster_options(bad)
    with pytest.raises(LaunchError, match="cluster file .*nowhere.sh not found"):
        cluster_options(tmp_path / "nowhere.sh")


def test_array_spec():
    assert array_spec([0]) == "0"
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def _job_script(script, args, tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ttc").write_text(FAKE_TTC)
    (bin_dir / "ttc").chmod(0o755)
    log = tmp_path / "ttc.log"
    log.unlink(missing_ok=True)
    base = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_TTC_LOG": str(log),
            "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "3",
            "MLFLOW_TRACKING_URI": "http://mlflow.cluster:5000", "MLFLOW_RUN_ID": "run-of-the-submitting-shell",
            "MLFLOW_EXPERIMENT_ID": "7", "_MLFLOW_ACTIVE_MODEL_ID": "m-1"}
    done = subprocess.run(["bash", str(REPO / "slurm" / script), *args], env={**base, **env},
                          capture_output=True, text=True)
    return done, log.read_text().splitlines() if log.exists() else []


def test_chunk_task_drops_run_scoped_mlflow_state(tmp_path):
    done, lines = _job_script("chunks.sbatch", ["/shared/recipe.yaml", "4", "parent123"], tmp_path,
                              SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="55")
    assert done.returncode == 0, done.stderr
    assert "chunk 2 of 4: job 55_2" in done.stdout
    assert lines == ["run /shared/recipe.yaml --chunk 2 --num-chunks 4 --parent-run-id parent123 --no-progress",
                     "MLFLOW_TRACKING_URI=http://mlflow.cluster:5000", "OMP_NUM_THREADS=3"]
    outside, _ = _job_script("chunks.sbatch", ["/shared/recipe.yaml", "4"], tmp_path)
    assert outside.returncode != 0 and "not an array task" in outside.stderr


def test_merge_job_stops_when_merge_refuses(tmp_path):
    done, lines = _job_script("merge_evaluate.sbatch", ["parent123"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert [line for line in lines if not line.startswith(("MLFLOW_", "OMP_"))] == [
        "merge --parent-run-id parent123", "evaluate --parent-run-id parent123"]
    assert not any(line.startswith(("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "_MLFLOW")) for line in lines)
    failed, lines = _job_script("merge_evaluate.sbatch", ["parent123"], tmp_path, FAKE_MERGE_FAILS="1")
    assert failed.returncode == 1 and "missing chunks: rows 2:4" in failed.stderr
    assert not any(line.startswith("evaluate") for line in lines)


def test_credentials_reach_the_jobs_through_the_environment_only(slurm, fake_server, recipe_file, tmp_path,
                                                                monkeypatch):
    """An authenticated tracking server: sbatch passes the caller's environment to the jobs, so the
    credentials travel there and nowhere else (not in argv, the recipe copy or the logs)."""
    secret = "s3cret-never-written"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    done = launch(str(recipe_file), [], 2, log_dir=tmp_path / "logs")
    sbatch = slurm("sbatch")
    assert len(sbatch) == 2 and all(c["password"] == secret for c in sbatch)
    assert not any(secret in arg for c in sbatch for arg in c["argv"])
    written = [f for f in (tmp_path / "logs").rglob("*") if f.is_file()]
    assert written and not any(secret in f.read_text() for f in written)
    run = store.client().get_run(done.parent_run_id)
    assert not any(secret in v for v in {**run.data.params, **run.data.tags}.values())
