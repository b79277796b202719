"""Comparing the evaluated parents of an experiment: accuracy against N per strategy and voting rule.

    ttc compare --experiment ttc-embedded --output accuracy.png

For every (policy model, strategy) one line per voting rule, one panel per rule. Where several
runs of a strategy measured the same n (say N=16 and N=64 runs, both subsampled at n=4), the run
with the larger N gives the point, then the newer one. Runs of different benchmarks (MATH-500,
GSM8K, AIME: different problem sets) are never pooled: compare refuses them unless
`allow_mixed`, and then each benchmark has lines of its own, named after it. Which problems a run
graded is its logged MLflow dataset (`store.problem_set`, what the `best` alias compares too). The figure and its
table are logged to a `ttc.role=compare` run of the experiment.
"""

from __future__ import annotations

from .. import names
from ..plots import RULE_TITLES, Curve, compare_figure, format_table, table
from . import store


class MixedProblemsError(LookupError):
    """The runs to compare graded different problem sets."""


def collect(experiment: str, model: str | None = None, allow_mixed: bool = False) -> list[Curve]:
    """Curves of the evaluated parent runs of an experiment; refuses runs of different problem sets
    (count and digest of problem ids) unless `allow_mixed`."""
    runs = store.evaluated_parents(experiment, model)
    if not runs:
        raise LookupError(f"experiment={experiment!r} has no evaluated parent runs"
                          + (f" of model={model!r}" if model else "") + ": run `ttc evaluate` first")
    benchmarks = {run.data.tags.get(names.TAG_DATASET, "?") for run in runs}
    curves: dict[tuple[str, str, str, str], Curve] = {}
    for run in runs:
        tags = run.data.tags
        label = names.model_label_of(tags.get(names.TAG_MODEL, "?"))
        benchmark = tags.get(names.TAG_DATASET, "?")
        if len(benchmarks) > 1:  # allowed mixed: a line per benchmark, never one line across them
            label = f"{label} on {benchmark.rstrip('/').split('/')[-1]}"  # MATH-500, builtin:gsm8k, aime_2024
        strategy = tags.get(names.TAG_STRATEGY, "?")
        big_n = int(tags.get(names.TAG_N, 0))
        problem_set = store.problem_set(run).key  # the logged dataset (the tags for older runs), as `best` reads it
        for rule in RULE_TITLES:
            if rule not in run.data.metrics:
                continue
            curve = curves.setdefault((benchmark, label, strategy, rule), Curve(label, strategy, rule))
            curve.problem_sets.add(problem_set)
            for n, value in store.metric_steps(run.info.run_id, rule).items():
                rank = (big_n, run.info.start_time)
                if n not in curve.source or rank > curve.source[n]:
                    curve.points[n], curve.source[n] = value, rank
    found = sorted({ps for c in curves.values() for ps in c.problem_sets})
    if len(found) > 1 and not allow_mixed:
        lines = "\n  ".join(f"{r.data.tags.get(names.TAG_RUN_NAME, r.info.run_id)} ({r.info.run_id}): "
                            f"{ps.name}, {ps.problems} problems, set {ps.digest}"
                            for r, ps in ((r, store.problem_set(r)) for r in runs))
        raise MixedProblemsError(f"experiment={experiment!r}: its evaluated runs graded {len(found)} different problem "
                                 f"sets; compare runs of one set (--model), or pass --allow-mixed to draw them anyway:"
                                 f"\n  {lines}")
    return sorted(curves.values(), key=lambda c: (c.model, c.strategy, list(RULE_TITLES).index(c.rule)))


def compare(experiment: str, model: str | None, output: str, allow_mixed: bool = False) -> tuple[list[Curve], str, str]:
    """Draw, write the PNG, log it (and the table) to a compare run of the experiment.
    Returns (curves, the table as text, the compare run id)."""
    curves = collect(experiment, model, allow_mixed)
    fig = compare_figure(curves, f"{experiment}" + (f" ({model})" if model else ""))
    fig.savefig(output, dpi=120)
    header, rows = table(curves)
    run_id = store.create_compare_run(experiment, {names.TAG_MODEL: model} if model else {})
    store.log_figure(run_id, fig, names.COMPARE_PLOT)
    store.log_table(run_id, [dict(zip(header, r)) for r in rows], names.COMPARE_TABLE)
    store.set_status(run_id, "FINISHED")
    return curves, format_table(header, rows), run_id
