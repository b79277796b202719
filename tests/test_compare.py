"""`ttc compare`: accuracy against N per strategy and voting rule, from evaluated parent runs."""

from pathlib import Path

import pytest
from fakes import FakePolicy, FakePRM
from typer.testing import CliRunner

from ttc_mlops import names
from ttc_mlops.cli import app
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.compare import collect
from ttc_mlops.pipeline.evaluate import evaluate_parent
from ttc_mlops.pipeline.merge import log_merge, merge
from ttc_mlops.pipeline.run_chunk import run_chunk
from ttc_mlops.plots import compare_figure

PROBLEMS = builtin_problems()[:4]
SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.8]", "So \\boxed{0}[s=0.4]"] for p in PROBLEMS}


def evaluated(**kw):
    r = Recipe(**{"model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL, "dataset_name": BUILTIN_DATASET,
                  "num_samples": 4, "experiment_name": "cmp", **kw})
    pid = run_chunk(r, FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
    log_merge(merge(pid, r))
    evaluate_parent(pid, r, register=False, workers=1)
    return pid


def relabel(pid, strategy):
    """A second strategy's parent, as the other strategies' modules would produce it."""
    store.set_tags(pid, {names.TAG_STRATEGY: strategy})


@pytest.mark.slow
def test_compare_draws_one_line_per_strategy_in_every_panel(mlflow_store, tmp_path):
    evaluated(n=4)
    evaluated(n=8)  # the same strategy at a larger N: one line, points from the N=8 run
    relabel(evaluated(n=4, seed=7), "dvts")
    curves = collect("cmp")
    fig = compare_figure(curves, "cmp")
    assert len(fig.axes) == 4  # naive, weighted, majority, pass@n
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        assert sorted(line.get_label() for line in ax.lines) == ["SmolLM2-135M-Instruct best_of_n",
                                                                  "SmolLM2-135M-Instruct dvts"]
    bon = next(c for c in curves if c.strategy == "best_of_n" and c.rule == "acc_naive")
    assert sorted(bon.points) == [1, 2, 4, 8] and all(src[0] == 8 for src in bon.source.values())

    out = CliRunner().invoke(app, ["compare", "--experiment", "cmp", "--output", str(tmp_path / "cmp.png")])
    assert out.exit_code == 0, out.output
    png = Path(tmp_path / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best_of_n  acc_naive" in out.output and "n=8" in out.output
    runs = store.client().search_runs([store.client().get_experiment_by_name("cmp").experiment_id],
                                         filter_string=f"tags.`{names.TAG_ROLE}` = 'compare'")
    assert len(runs) == 1
    assert {a.path for a in store.client().list_artifacts(runs[0].info.run_id, "compare")} == {
        names.COMPARE_PLOT, names.COMPARE_TABLE}


def test_compare_names_what_is_missing(mlflow_store):
    cli = CliRunner()
    out = cli.invoke(app, ["compare", "--experiment", "nope"])
    assert out.exit_code == 1 and "experiment='nope' does not exist" in out.output
    store.ensure_experiment("empty")
    out = cli.invoke(app, ["compare", "--experiment", "empty"])
    assert out.exit_code == 1 and "has no evaluated parent runs" in out.output


@pytest.mark.slow
def test_compare_refuses_runs_of_different_problem_sets_unless_asked(mlflow_store, tmp_path):
    evaluated(n=4)
    relabel(evaluated(n=4, seed=7, num_samples=2), "dvts")  # DVTS on 2 problems beside best-of-N on 4
    out = CliRunner().invoke(app, ["compare", "--experiment", "cmp", "--output", str(tmp_path / "c.png")])
    assert out.exit_code == 1 and "graded 2 different problem sets" in out.output
    assert "4 problems, set" in out.output and "2 problems, set" in out.output
    out = CliRunner().invoke(app, ["compare", "--experiment", "cmp", "--output", str(tmp_path / "c.png"), "--allow-mixed"])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("SmolLM2-135M-Instruct  dvts"))
    assert "  2  " in line  # each line says how many problems it graded


@pytest.mark.slow
def test_compare_keeps_benchmarks_apart(mlflow_store, tmp_path):
    import json

    import pytest

    from ttc_mlops.pipeline.compare import MixedProblemsError

    other = tmp_path / "other-benchmark.jsonl"  # the same texts as another benchmark: other problem ids
    other.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in PROBLEMS))
    evaluated(n=4)
    evaluated(n=8, dataset_name=str(other))
    with pytest.raises(MixedProblemsError) as refused:
        collect("cmp")
    assert f"{BUILTIN_DATASET}, 4 problems" in str(refused.value) and f"{other}, 4 problems" in str(refused.value)
    curves = [c for c in collect("cmp", allow_mixed=True) if c.rule == "acc_naive"]
    assert {c.label for c in curves} == {f"SmolLM2-135M-Instruct on {BUILTIN_DATASET} best_of_n",
                                         "SmolLM2-135M-Instruct on other-benchmark.jsonl best_of_n"}
    assert sorted(sorted(c.points) for c in curves) == [[1, 2, 4], [1, 2, 4, 8]]  # never one line across them
