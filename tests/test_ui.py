"""The MLflow UI as a researcher sees it: a real `mlflow server` on 127.0.0.1, a small beam search
merged and evaluated, and headless Chromium (Debian's `chromium`, no driver) reading the pages.

    python -m pytest -q -m server tests/test_ui.py

Chromium runs the UI's JavaScript for a fixed budget of virtual time and prints the rendered DOM
(`--dump-dom`); screenshots of the same pages are kept in the test's tmp_path for people to look at.
Pages open in the UI's "Model training" view (`?workflowType=machine_learning`, what 3.17's UI reads
besides the experiment's `mlflow.experimentKind` tag).
"""

import shutil
import subprocess

import pytest
from fakes import FakePolicy, FakePRM

from ttc_mlops import names
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline.evaluate import evaluate_parent
from ttc_mlops.pipeline.merge import log_merge, merge
from ttc_mlops.pipeline.run_chunk import run_chunk

pytestmark = pytest.mark.server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBLEMS = builtin_problems()[:4]
SCRIPT = {p.problem: [f"Work it out.[s=0.6]\n\nStep two.[s=0.7]\n\nSo \\boxed{{{p.answer}}}[s=0.8]",
                      "Guess.[s=0.5]\n\nSo \\boxed{0}[s=0.3]"] for p in PROBLEMS}


def chromium(url: str, *args: str, size: str = "1500,1100", budget_ms: int = 30000) -> str:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--window-size={size}", f"--virtual-time-budget={budget_ms}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


def page(url: str, shot, size: str = "1500,1100", budget_ms: int = 30000) -> str:
    chromium(url, f"--screenshot={shot}", size=size, budget_ms=budget_ms)
    return chromium(url, "--dump-dom", size=size, budget_ms=budget_ms)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_run_page_shows_accuracy_problems_and_search_trees(mlflow_server, tmp_path):
    r = Recipe(approach="beam_search", model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET,
               num_samples=4, n=4, beam_width=2, num_iterations=3, experiment_name="ui", trace_problems=3)
    pid = run_chunk(r, FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
    log_merge(merge(pid, r))
    traced = evaluate_parent(pid, r, workers=1).traces
    from ttc_mlops.pipeline import store

    exp = store.get_run(pid).info.experiment_id
    run_url = f"{mlflow_server}/#/experiments/{exp}/runs/{pid}"
    view = "?workflowType=machine_learning"

    overview = page(run_url, tmp_path / "run.png")
    for text in ("acc_weighted", "acc_naive", "pass", "beam_search", names.EVAL_PROBLEMS):  # metrics and the description
        assert text in overview, text
    assert "beam_width" in overview  # a beam search shows its beam settings

    problems = page(f"{run_url}/artifacts/{names.EVAL_PROBLEMS}", tmp_path / "problems.png")
    assert all(p.problem_id in problems for p in PROBLEMS) and "selected" in problems

    tree_page = f"{names.EVAL_DIR}/search-0000-0003.html"
    listing = page(f"{run_url}/artifacts/{tree_page}", tmp_path / "tree-in-ui.png")
    assert "mlflow-html-iframe" in listing  # the UI shows the page in its frame
    # what the frame shows: the artifact as stored, rendered (the server sends it as a download)
    (tmp_path / "tree.html").write_text(store.load_run_text(pid, tree_page))
    tree = page((tmp_path / "tree.html").as_uri(), tmp_path / "tree.png")
    assert "search tree (" in tree and "kept" in tree and "pruned" in tree and "finished" in tree
    assert all(f"gold <code>{p.answer}</code>" in tree for p in PROBLEMS)

    # the problems as a dataset: in the run's Datasets panel and the experiment's runs table
    assert f"{BUILTIN_DATASET} (" in overview and "Datasets" in overview
    digest = store.get_run(pid).data.tags[names.TAG_PROBLEM_SET]
    runs = page(f"{mlflow_server}/#/experiments/{exp}{view}", tmp_path / "runs.png")
    assert f"{BUILTIN_DATASET} ({digest})" in runs and "Model training" in runs

    # the search as traces: one per sampled problem in the run's Traces tab
    assert len(traced) == 3
    listing = page(f"{run_url}/traces{view}", tmp_path / "traces.png")
    sampled = [t.info.tags[names.TRACE_TAG_PROBLEM] for t in store.client().search_traces(
        locations=[exp], run_id=pid, include_spans=False)]
    assert len(sampled) == 3 and all(f'"problem_id": "{p}"' in listing for p in sampled), sampled
    assert '"verdict": ' in listing
    # one trace opened: its iteration spans in the tree, the root's per-iteration step scores beside it
    one = store.client().get_trace(traced[0])
    trace = page(f"{run_url}/traces{view}&selectedEvaluationId={traced[0]}", tmp_path / "trace.png", size="2400,1300",
                 budget_ms=60000)  # the trace drawer loads after the list: 30 s of virtual time left it out of the screenshot
    iterations = [s.name for s in one.data.spans if s.name.startswith("iteration")]
    assert iterations and all(name in trace for name in iterations) and "select" in trace
    best = next(s for s in one.data.spans if s.name == iterations[0]).attributes["best_step_score"]
    assert "best_step_score" in trace and f"{best}" in trace
