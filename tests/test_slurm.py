"""On a real Slurm cluster: `ttc launch` end to end; 8 tasks logging at once, one cancelled and recovered.

    python -m pytest -q -m slurm tests/test_slurm.py

A module fixture starts a single-node cluster (munged, slurmctld, slurmd) and an `mlflow server`
(SQLite backend, local artifact root) with tests/cluster/up.sh and stops all of them with down.sh,
whatever happens. The tasks run the real job scripts and the real `ttc run` / `ttc merge` /
`ttc evaluate`: the first test with the embedded SmolLM2, the others with a 2-layer random Llama
(the same code paths, fast enough that 8 tasks share 2 cores and a task can be cancelled part-way).
Needs root and Debian's slurmctld slurmd slurm-client munge (.ci/run installs them).
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from ttc_mlops import names
from ttc_mlops.config import load_recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store

pytestmark = pytest.mark.slurm

RECIPE = REPO / "recipes/SmolLM2-135M-Instruct/best_of_n.yaml"
JOB_TIMEOUT_S = 900


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.env = dict(os.environ)
        for key in [k for k in self.env if k.startswith(("MLFLOW_", "SLURM_"))]:
            del self.env[key]
        for line in (state / "env.sh").read_text().splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            self.env[key] = value
        self.uri = self.env["MLFLOW_TRACKING_URI"]

    def run(self, *cmd, cwd, env=None, check=True) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=JOB_TIMEOUT_S)
        if check and done.returncode:
            raise AssertionError(f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def ttc(self, *args, cwd, env=None, check=True):
        return self.run(sys.executable, "-m", "ttc_mlops.cli", *args, cwd=cwd, env=env, check=check)

    def states(self, job: str) -> dict[str, str]:
        """JobState of a job, or of each task of an array job (keyed by task id), once it left the queue."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while self.run("squeue", "-h", "-j", job, cwd=self.state).stdout.strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still queued after {JOB_TIMEOUT_S}s:\n" + self.logs())
            time.sleep(1)
        shown = self.run("scontrol", "-o", "show", "job", job, cwd=self.state).stdout
        states = {}
        for line in shown.splitlines():
            task = re.search(r"ArrayTaskId=(\d+)", line)
            states[task.group(1) if task else job] = re.search(r"JobState=(\w+)", line).group(1)
        return states

    def spans(self, job: str) -> list[tuple[str, str]]:
        """(StartTime, EndTime) of each task of a finished array job, ISO strings (compare as text)."""
        shown = self.run("scontrol", "-o", "show", "job", job, cwd=self.state).stdout
        return [(re.search(r"StartTime=(\S+)", line).group(1), re.search(r"EndTime=(\S+)", line).group(1))
                for line in shown.splitlines()]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.state / "log").glob("*.log")))

    def requests(self, endpoint: str) -> int:
        """Requests the tracking server answered on an endpoint (uvicorn's access log)."""
        return (self.state / "log" / "mlflow.log").read_text().count(f"/api/2.0/mlflow/{endpoint} ")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({missing}): apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("slurmd needs root")
    state = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        with open(state / "up.out", "w") as out:
            up = subprocess.run([str(REPO / "tests/cluster/up.sh"), str(state)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, timeout=300)
        if up.returncode:
            raise RuntimeError(f"up.sh failed:\n{(state / 'up.out').read_text()}")
        yield Cluster(state)
    finally:
        subprocess.run([str(REPO / "tests/cluster/down.sh"), str(state)], timeout=180)


@pytest.fixture
def server(cluster, monkeypatch):
    """This test process's MLflow client talks to the cluster's server."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(cluster.uri)
    yield store.client()
    mlflow.set_tracking_uri(None)


def launched(output: str) -> tuple[str, str | None, str]:
    """(parent run id, array job id, merge job id) from `ttc launch`'s output."""
    parent = re.search(r"^parent run\s+(\w+)", output, re.M).group(1)
    array = re.search(r"^chunks\s+job (\d+):", output, re.M)
    merge = re.search(r"^merge \+ evaluate\s+job (\d+)", output, re.M).group(1)
    return parent, array.group(1) if array else None, merge


def job_logs(cwd: Path, parent: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((cwd / "slurm-logs" / parent).glob("*.out")))


def chunk_runs_by_rows(parent: str) -> dict[str, object]:
    runs = store.chunk_runs(parent)
    rows = [r.data.tags[names.TAG_ROWS] for r in runs]
    assert len(rows) == len(set(rows)), f"duplicate chunk runs: {sorted(rows)}"
    return {r.data.tags[names.TAG_ROWS]: r for r in runs}


def merged_ids(parent: str) -> list[str]:
    records = store.load_records(parent, names.MERGED_RECORDS)
    assert records is not None, f"parent {parent} has no {names.MERGED_RECORDS}"
    return [r.problem_id for r in records]


def tiny_overrides(tiny_llama_dir, **kw) -> list[str]:
    values = {"model_path": tiny_llama_dir, "prm_path": tiny_llama_dir, "prm_family": "rlhflow", "n": 2,
              "max_tokens": 24, "search_batch_size": 1, **kw}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def test_array_job_then_merge_and_evaluate_on_the_embedded_recipe(cluster, server, tmp_path):
    # The submitting shell sits inside another run (as under `mlflow run`): no task may write to it.
    shell_exp = store.ensure_experiment("launching-shell")
    shell_run = server.create_run(shell_exp, tags={names.TAG_ROLE: "parent", names.TAG_SEARCH_KEY: "another"})
    shell_id = shell_run.info.run_id
    before = server.get_run(shell_id).data

    t0 = time.monotonic()
    sets = ["num_samples=4", "n=2", "max_tokens=24", "experiment_name=slurm-embedded"]
    out = cluster.ttc("launch", str(RECIPE), "--chunks", "4",
                      *[a for s in sets for a in ("--set", s)], cwd=tmp_path, env={"MLFLOW_RUN_ID": shell_id}).stdout
    parent, array, merge = launched(out)
    assert cluster.states(array) == {str(i): "COMPLETED" for i in range(4)}, job_logs(tmp_path, parent)
    assert cluster.states(merge) == {merge: "COMPLETED"}, job_logs(tmp_path, parent)
    wall = time.monotonic() - t0

    chunks = chunk_runs_by_rows(parent)
    assert sorted(chunks) == ["0:1", "1:2", "2:3", "3:4"]
    assert all(r.info.status == "FINISHED" and r.data.metrics[names.M_PROBLEMS] == 1 for r in chunks.values())
    assert merged_ids(parent) == [p.problem_id for p in builtin_problems()[:4]]
    run = server.get_run(parent)
    assert run.data.tags[names.TAG_MERGED] == "complete"
    for metric in names.VOTING_METRICS:
        assert sorted(m.step for m in server.get_metric_history(parent, metric)) == [1, 2], metric
    recipe = load_recipe(RECIPE, sets)
    versions = server.search_model_versions(f"name = '{names.registered_model_name(recipe)}'")
    assert parent in {v.run_id for v in versions}
    # environment hygiene: the shell's run got no tags, children or metrics from the tasks
    after = server.get_run(shell_id).data
    assert (after.tags, after.metrics, after.params) == (before.tags, before.metrics, before.params)
    assert store.chunk_runs(shell_id) == []
    logs = sorted((tmp_path / "slurm-logs" / parent).glob("ttc-chunks-*.out"))
    assert len(logs) == 4 and all(f"chunk {i} of 4" in p.read_text() for i, p in enumerate(logs))
    assert wall < JOB_TIMEOUT_S


def test_eight_tasks_at_once_one_cancelled_then_only_missing_completes(cluster, server, tmp_path, tiny_llama_dir):
    """K = 8 tasks log to the server at once; one is cancelled part-way and recovered (issue points 4, 5)."""
    k, per_chunk = 8, 4
    sets = tiny_overrides(tiny_llama_dir, num_samples=k * per_chunk, max_tokens=32, experiment_name="slurm-fault")
    single_metric_calls = cluster.requests("runs/log-metric")
    out = cluster.ttc("launch", str(RECIPE), "--chunks", str(k), *sets, cwd=tmp_path).stdout
    parent, array, merge = launched(out)

    # cancel chunk 1 (rows 4:8) once its first problem is checkpointed, before it finishes
    deadline, saved = time.monotonic() + JOB_TIMEOUT_S, []
    while not saved:
        assert time.monotonic() < deadline, job_logs(tmp_path, parent)
        run = chunk_runs_by_rows(parent).get("4:8")
        saved = (run and store.load_records(run.info.run_id, names.chunk_artifact(4, 8))) or []
        time.sleep(0.2)
    cluster.run("scancel", f"{array}_1", cwd=tmp_path)
    states = cluster.states(array)
    assert states == {str(i): "CANCELLED" if i == 1 else "COMPLETED" for i in range(k)}, job_logs(tmp_path, parent)
    tasks = cluster.spans(array)
    assert len(tasks) == k and max(s for s, _ in tasks) < min(e for _, e in tasks), tasks  # all K ran at once
    assert cluster.states(merge)[merge] == "CANCELLED"  # afterok never holds: no merge of a partial parent
    killed = chunk_runs_by_rows(parent)["4:8"]
    checkpoint = store.load_records(killed.info.run_id, names.chunk_artifact(4, 8))
    assert killed.info.status != "FINISHED" and 0 < len(checkpoint) < per_chunk, (killed.info.status, len(checkpoint))

    # the merge job alone (submitted by hand from the repository root) refuses and names the missing chunk
    refused = cluster.run("sbatch", "--wait", f"--output={tmp_path}/merge-alone.out", "slurm/merge_evaluate.sbatch",
                          parent, cwd=REPO, check=False)
    assert refused.returncode != 0
    assert "4:8" in (tmp_path / "merge-alone.out").read_text()
    assert store.load_records(parent, names.MERGED_RECORDS) is None

    out = cluster.ttc("launch", str(RECIPE), "--chunks", str(k), "--only-missing", *sets, cwd=tmp_path).stdout
    again, array2, merge2 = launched(out)
    assert again == parent and f"1 of {k} chunks" in out
    assert cluster.states(array2) == {"1": "COMPLETED"}, job_logs(tmp_path, parent)
    assert cluster.states(merge2) == {merge2: "COMPLETED"}, job_logs(tmp_path, parent)

    # recovery: the killed chunk's run continued from its checkpoint; nothing lost or duplicated
    chunks = chunk_runs_by_rows(parent)
    assert chunks["4:8"].info.run_id == killed.info.run_id
    log = next((tmp_path / "slurm-logs" / parent).glob(f"ttc-chunks-*_{array2}_1.out")).read_text()
    assert f"from {len(checkpoint)} saved problems" in log
    merged = store.load_records(parent, names.MERGED_RECORDS)
    assert [r.problem_id for r in merged] == [p.problem_id for p in builtin_problems()[: k * per_chunk]]
    by_id = {r.problem_id: r.to_dict() for r in merged}
    assert all(by_id[r.problem_id] == r.to_dict() for r in checkpoint)  # what was saved is what was merged
    assert server.get_run(parent).data.tags[names.TAG_MERGED] == "complete"

    # load: every task's params, metrics and records arrived; one parent; metrics never one per request
    assert len(chunks) == k and all(r.info.status == "FINISHED" for r in chunks.values())
    params = len(load_recipe(RECIPE).params())  # the fields its strategy reads
    for rows, run in chunks.items():
        start, end = map(int, rows.split(":"))
        assert run.data.metrics[names.M_PROBLEMS] == per_chunk and run.data.metrics[names.M_COMPLETION_TOKENS] > 0
        assert {"gen_s", "prm_s", names.M_WALL_S, names.M_TOKENS_PER_S} <= set(run.data.metrics)
        assert len(run.data.params) == params
        assert len(store.load_records(run.info.run_id, names.chunk_artifact(start, end))) == per_chunk
    experiment = server.get_experiment_by_name("slurm-fault").experiment_id
    parents = server.search_runs([experiment], f"tags.`{names.TAG_ROLE}` = 'parent'")
    assert [p.info.run_id for p in parents] == [parent]
    spans = sorted((r.info.start_time, r.info.end_time) for r in chunks.values())
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap >= k // 2, spans  # the tasks were writing at once
    assert cluster.requests("runs/log-metric") == single_metric_calls
    errors = re.findall(r'"[A-Z]+ (\S+) HTTP/[\d.]+" 5\d\d', (cluster.state / "log" / "mlflow.log").read_text())
    assert errors == [], errors  # the server failed no request
