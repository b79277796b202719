"""`mlflow run -e beam_search` and `-e dvts` for real, with the embedded SmolLM2, on tiny budgets."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e

# One problem, 2 x 2 candidates per step, 2 steps of at most 16 tokens: at most 128 tokens of sampling.
TINY = "num_samples=1 n=4 beam_width=2 num_iterations=2 max_tokens=16"


def _run(entry_point: str, mlflow_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local",
           "--experiment-name", "e2e", "-P", f"set={TINY}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    from ttc_mlops import names
    from ttc_mlops.pipeline import store

    c = store.client()
    runs = c.search_runs([c.get_experiment_by_name("e2e").experiment_id])
    chunk = next(r for r in runs if r.data.tags.get(names.TAG_ROLE) == "chunk")
    assert chunk.data.tags[names.TAG_STRATEGY] == entry_point
    m = chunk.data.metrics
    assert m[names.M_PROBLEMS] == 1 and m[names.M_GENERATE_CALLS] >= 1 and m[names.M_PRM_TOKENS] > 0
    assert m[names.M_GEN_S] > 0 and m[names.M_PRM_S] > 0 and m[names.M_OTHER_S] >= 0
    # compute: 2 x parameters x tokens, as run and without prefix reuse (a step-level search reuses)
    assert 100e6 < m[names.M_POLICY_PARAMS] < 170e6 and m[names.M_PRM_PARAMS] > 0  # SmolLM2-135M, embeddings aside
    assert m[names.M_PROMPT_TOKENS_FULL] > m[names.M_PROMPT_TOKENS] > 0 and m[names.M_PRM_TOKENS_FULL] > m[names.M_PRM_TOKENS]
    assert m[names.M_POLICY_FLOPS] == 2 * m[names.M_POLICY_PARAMS] * (m[names.M_PROMPT_TOKENS] + m[names.M_GENERATED_TOKENS])
    assert m[names.M_FLOPS] == m[names.M_POLICY_FLOPS] + m[names.M_PRM_FLOPS] < m[names.M_POLICY_FLOPS_FULL] + m[names.M_PRM_FLOPS_FULL]
    [record] = store.load_records(chunk.info.run_id, names.chunk_artifact(0, 1))
    assert record.approach == entry_point
    assert 0 < len(record.completions) <= 4 and len(set(record.completions)) == len(record.completions)
    assert all(t is not None and t > 0 for t in record.completion_tokens)
    assert all(0 <= s <= 1 for steps in record.step_scores for s in steps)
    leaves = [n for n in record.tree if n.completion is not None]
    assert sorted(n.completion for n in leaves) == list(range(len(record.completions)))
    for leaf in leaves:  # every completion is its path of steps in the tree
        text, node = "", leaf
        while node is not None:
            text = node.step + text
            node = record.tree[node.parent] if node.parent is not None else None
        assert text == record.completions[leaf.completion]
    return record


def test_beam_search_entry_point_with_the_embedded_model(mlflow_store, tmp_path):
    record = _run("beam_search", mlflow_store, tmp_path)
    assert set(record.groups) == {0}
    assert all(n.iteration < 2 and n.tokens <= 16 for n in record.tree)


def test_dvts_entry_point_with_the_embedded_model(mlflow_store, tmp_path):
    record = _run("dvts", mlflow_store, tmp_path)
    assert len(record.completions) == 4 and record.groups == [0, 0, 1, 1]
