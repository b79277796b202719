"""Records are a function of (recipe, seed, problem, batch): a chunk killed with SIGKILL after its
first checkpoint and run again, the same problems cut into other chunks (batch boundaries aligned),
and a plain run give identical records, with the default dtype (bf16 on a CPU that computes it).

    python -m pytest -q -m e2e tests/test_resume.py
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ttc_mlops import names
from ttc_mlops.config import load_recipe
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.run_chunk import run_chunk

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "SmolLM2-135M-Instruct" / "best_of_n.yaml"
# 4 problems in 2 search batches; enough tokens that the second batch's prompts could profit from
# what the first left in the prefix caches
SETS = ["num_samples=4", "n=4", "max_tokens=64", "search_batch_size=2"]

pytestmark = pytest.mark.e2e


def ttc_run(experiment: str, *extra: str) -> subprocess.Popen:
    args = [a for s in [*SETS, f"experiment_name={experiment}"] for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "ttc_mlops.cli", "run", str(RECIPE), *args, *extra, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def chunk_run(experiment: str):
    exp = store.client().get_experiment_by_name(experiment)
    runs = [] if exp is None else store.client().search_runs(
        [exp.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_CHUNK}'")
    return runs[0] if runs else None


def checkpointed(experiment: str) -> bool:
    run = chunk_run(experiment)
    return run is not None and bool(store.client().list_artifacts(run.info.run_id, names.RECORDS_DIR))


def records_of(experiment: str, start: int = 0, end: int = 4):
    return [r.to_dict() for r in store.load_records(chunk_run(experiment).info.run_id, names.chunk_artifact(start, end))]


def test_kill_resume_rechunk_and_rerun_give_identical_records(mlflow_store):
    plain = ttc_run("plain", "--chunk", "0", "--num-chunks", "1")
    killed = ttc_run("killed", "--chunk", "0", "--num-chunks", "1")
    deadline = time.time() + 600
    while not checkpointed("killed"):  # the first search batch (2 of 4 problems) is saved
        assert killed.poll() is None, f"finished before it could be killed: {killed.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    saved = store.load_records(chunk_run("killed").info.run_id, names.chunk_artifact(0, 4))
    assert len(saved) == 2

    resumed = ttc_run("killed", "--chunk", "0", "--num-chunks", "1")
    for proc in (plain, resumed):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    assert "(2 from checkpoint)" in out
    reference = records_of("plain")
    assert records_of("killed") == reference

    # the same problems in two chunks of one search batch each, in this process
    recipe = load_recipe(RECIPE, [*SETS, "experiment_name=rechunked"])
    halves = [run_chunk(recipe.model_copy(update={"chunk": c, "num_chunks": 2}), progress=False).records
              for c in (1, 0)]  # the second half first: what ran before must not matter
    assert [r.to_dict() for r in halves[1] + halves[0]] == reference
    # and a plain re-run in this process, after all that was cached above
    again = run_chunk(recipe.model_copy(update={"experiment_name": "again", "chunk": 0, "num_chunks": 1}),
                      progress=False).records
    assert [r.to_dict() for r in again] == reference
