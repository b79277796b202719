"""`ttc launch --serve-prm`: one `vllm serve --runner pooling` job that every array task scores
through, stopped when the merge job ends. The submissions and the tasks' wait against fakes (fast),
then on a real Slurm cluster.

    python -m pytest -q -p no:cacheprovider tests/test_slurm_served.py -m "not slow"
    TTC_MLFLOW_WORKERS=1 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m "slurm and vllm" tests/test_slurm_served.py

The cluster and its MLflow server are tests/test_slurm.py's (tests/cluster/up.sh, down.sh). The PRM
server is a real vLLM (vllm-cpu, from the interpreter running the tests) serving the embedded
SmolLM2 in float32 inside its own Slurm job; the policy is the 2-layer random Llama, so the 4
tasks are quick once the server is healthy. The tasks run the plain `ttc` on PATH: they need no
vLLM of their own.
"""

import os
import re
import subprocess
import time

import pytest
from test_launch import fake_server, recipe_file, slurm  # noqa: F401
from test_slurm import (  # noqa: F401
    REPO,
    chunk_runs_by_rows,
    cluster,
    job_logs,
    launched,
    merged_ids,
    server,
)
from test_vllm import _same

from ttc_mlops import names
from ttc_mlops.config import EMBEDDED_MODEL, load_recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.launch import SERVER_FILE, LaunchError, launch, wait_for_server

RECIPE = REPO / "recipes/SmolLM2-135M-Instruct/best_of_n.yaml"
KEY = "sweep-key"

CLUSTER_FILE = """
CHUNK_SBATCH=(--cpus-per-task=1 --time=00:30:00)
MERGE_SBATCH=(--cpus-per-task=1 --time=00:30:00)
SERVE_SBATCH=(--cpus-per-task=1 --time=00:45:00)
ttc_env() { export OMP_NUM_THREADS=1; }
ttc_serve_env() {
    ttc_env
    export VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_OMP_THREADS_BIND=%s
}
"""


@pytest.mark.slurm
@pytest.mark.vllm
def test_serve_prm_one_server_for_every_task_stopped_after_merge(cluster, server, tmp_path, tiny_llama_dir):  # noqa: F811
    pytest.importorskip("vllm")
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    (tmp_path / "cluster.sh").write_text(CLUSTER_FILE % cores)
    k = 4
    values = {"model_path": tiny_llama_dir, "prm_path": EMBEDDED_MODEL, "n": 2, "max_tokens": 16, "search_batch_size": 1,
              "num_samples": k, "dtype": "float32", "backend": "transformers", "experiment_name": "slurm-served"}
    sets = [a for key, v in values.items() for a in ("--set", f"{key}={v}")]
    out = cluster.ttc("launch", str(RECIPE), "--chunks", str(k), "--serve-prm", "--cluster-file", str(tmp_path / "cluster.sh"),
                      *sets, cwd=tmp_path, env={"VLLM_API_KEY": KEY}).stdout
    parent, array, merge = launched(out)
    served = re.search(r"^PRM server\s+job (\d+):", out, re.M).group(1)
    stop = re.search(r"job (\d+) if merge never runs", out).group(1)

    assert cluster.states(array) == {str(i): "COMPLETED" for i in range(k)}, job_logs(tmp_path, parent)
    assert cluster.states(merge) == {merge: "COMPLETED"}, job_logs(tmp_path, parent)
    assert cluster.states(served) == {served: "CANCELLED"}, job_logs(tmp_path, parent)  # stopped by the merge job
    assert cluster.states(stop)[stop] == "COMPLETED"

    logs = tmp_path / "slurm-logs" / parent
    server_log = next(logs.glob(f"ttc-prm-*_{served}.out")).read_text()
    url = re.search(r"PRM server healthy at (\S+) ", server_log).group(1)
    assert not (logs / "prm-server.url").exists()  # removed as the server stopped
    task_logs = sorted(logs.glob("ttc-chunks-*.out"))
    assert len(task_logs) == k and all(f"PRM served at {url} (job {served})" in p.read_text() for p in task_logs)
    assert server_log.count("POST /pooling HTTP/1.1\" 200") >= k  # every task scored through it
    assert "stopped the PRM server job" in next(logs.glob(f"ttc-merge-*_{merge}.out")).read_text()

    chunks = chunk_runs_by_rows(parent)
    assert len(chunks) == k and all(r.info.status == "FINISHED" for r in chunks.values())
    assert {r.data.params["prm_base_url"] for r in chunks.values()} == {url}
    assert all(r.data.metrics[names.M_PRM_TOKENS] > 0 for r in chunks.values())
    assert server.get_run(parent).data.tags[names.TAG_MERGED] == "complete"
    assert merged_ids(parent) == [p.problem_id for p in builtin_problems()[:k]]

    # the served sweep's records are the in-process ones (same seeds; the PRM on transformers, float32)
    from ttc_mlops.runner import run_search

    recipe = load_recipe(RECIPE, [f"{key}={v}" for key, v in values.items()] + ["prm_backend=transformers"])
    here = [r.to_dict() for r in run_search(recipe, builtin_problems()[:k])]
    merged = [r.to_dict() for r in store.load_records(parent, names.MERGED_RECORDS)]
    assert _same(merged, here, 1e-4)


# --- the submissions and the tasks' wait, against fake sbatch / squeue (no cluster, no model)

def test_serve_prm_submits_the_server_first_and_a_stopper_after_merge(slurm, recipe_file, fake_server, tmp_path):  # noqa: F811
    done = launch(str(recipe_file), [], 2, serve_prm=True, serve_args=["--max-num-seqs=8"], log_dir=tmp_path / "logs")
    sbatch = [c["argv"] for c in slurm("sbatch")]
    assert len(sbatch) == 4  # server, chunks, merge, stopper
    serve = sbatch[0]
    script = next(i for i, a in enumerate(serve) if a.endswith("slurm/serve_prm.sbatch"))
    assert serve[script + 1] == str(done.log_dir / SERVER_FILE)
    cmd = serve[script + 2:]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and cmd[-1] == "--max-num-seqs=8"
    assert cmd[cmd.index("--runner") + 1] == "pooling" and cmd[cmd.index("--served-model-name") + 1] == EMBEDDED_MODEL
    assert "--port" not in cmd and "--api-key" not in cmd  # the node picks the port; the key stays in the env
    assert any(a.startswith("--job-name=ttc-prm-") for a in serve)
    assert done.server_job == str(100) and done.array_job and done.merge_job
    stopper = sbatch[3]
    assert f"--dependency=afterany:{done.merge_job}" in stopper and f"--wrap=scancel {done.server_job}" in stopper
    assert done.stop_job is not None


def test_serve_prm_refuses_a_recipe_with_its_own_server(slurm, recipe_file, fake_server):  # noqa: F811
    with pytest.raises(LaunchError, match="already sets prm_base_url='http://h:1'; drop one of them"):
        launch(str(recipe_file), ["prm_base_url=http://h:1"], 2, serve_prm=True)
    with pytest.raises(LaunchError, match="prm_backend='transformers' runs it in every task"):
        launch(str(recipe_file), ["prm_backend=transformers"], 2, serve_prm=True)
    assert slurm("sbatch") == []


def test_the_job_scripts_read_the_server_file(tmp_path):
    chunks = (REPO / "slurm/chunks.sbatch").read_text()
    assert "ttc wait-server \"$TTC_PRM_SERVER_FILE\"" in chunks and "prm_base_url=$prm_url" in chunks
    assert 'scancel "$TTC_PRM_SERVER_JOB"' in (REPO / "slurm/merge_evaluate.sbatch").read_text()
    check = subprocess.run(["bash", "-n", str(REPO / "slurm/serve_prm.sbatch")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_wait_for_server_reads_the_file_then_health(tmp_path, slurm, monkeypatch):  # noqa: F811
    from stub_server import Stub, scripted

    stub = Stub({"/health": scripted([(200, {})])})
    try:
        url_file = tmp_path / SERVER_FILE
        with pytest.raises(LaunchError, match=r"no healthy PRM server in .* after 1 s \(no address written yet"):
            wait_for_server(url_file, None, timeout=1, poll=0.1)
        url_file.write_text(stub.url + "\n")
        assert wait_for_server(url_file, "77", timeout=5, poll=0.1) == stub.url
    finally:
        stub.close()
    url_file.write_text("http://127.0.0.1:9\n")  # nothing answers there, and squeue no longer lists job 77
    monkeypatch.setenv("FAKE_SQUEUE", "")
    t = time.monotonic()
    with pytest.raises(LaunchError, match="PRM server job 77 ended before it served at http://127.0.0.1:9"):
        wait_for_server(url_file, "77", timeout=60, poll=0.1)
    assert time.monotonic() - t < 10
