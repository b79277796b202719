"""Accuracy against the test-time budget N (log2 axis), per strategy and voting rule.

    ttc compare --experiment ttc-embedded --output accuracy.png

`compare` collects the evaluated parent runs of an experiment: for every (policy model, strategy)
one line per voting rule, one panel per rule, as in the test-time compute papers. Where several
runs of a strategy measured the same n (say N=16 and N=64 runs, both subsampled at n=4), the run
with the larger N gives the point, then the newer one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RULE_TITLES = {"acc_naive": "naive (best score)", "acc_weighted": "weighted vote",
               "acc_maj": "majority vote", "pass": "pass@n (any correct)"}


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.6), squeeze=False, sharey=True)
    return fig, list(axes[0])


def _axis(ax, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (completions per problem)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def run_figure(rows: list[dict], title: str):
    """One evaluated run: accuracy against n, one line per voting rule (overall rows)."""
    fig, (ax,) = _figure(1)
    overall = [r for r in rows if r["level"] == "all"]
    for rule, label in RULE_TITLES.items():
        points = [(r["n"], r[rule]) for r in overall if rule in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    _axis(ax, title)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@dataclass
class Curve:
    model: str
    strategy: str
    rule: str
    points: dict[int, float] = field(default_factory=dict)  # n -> accuracy
    source: dict[int, tuple[int, int]] = field(default_factory=dict)  # n -> (N of the run, start time)

    @property
    def label(self) -> str:
        return f"{self.model} {self.strategy}"


def collect(experiment: str, model: str | None = None) -> list[Curve]:
    """Curves of the evaluated parent runs of an experiment."""
    from . import tracking

    runs = tracking.evaluated_parents(experiment, model)
    if not runs:
        raise LookupError(f"experiment={experiment!r} has no evaluated parent runs"
                          + (f" of model={model!r}" if model else "") + ": run `ttc evaluate` first")
    curves: dict[tuple[str, str, str], Curve] = {}
    for run in runs:
        tags = run.data.tags
        label = tracking.model_label_of(tags.get(tracking.TAG_MODEL, "?"))
        strategy = tags.get(tracking.TAG_STRATEGY, "?")
        big_n = int(tags.get(tracking.TAG_N, 0))
        for rule in RULE_TITLES:
            if rule not in run.data.metrics:
                continue
            curve = curves.setdefault((label, strategy, rule), Curve(label, strategy, rule))
            for n, value in tracking.metric_steps(run.info.run_id, rule).items():
                rank = (big_n, run.info.start_time)
                if n not in curve.source or rank > curve.source[n]:
                    curve.points[n], curve.source[n] = value, rank
    return sorted(curves.values(), key=lambda c: (c.model, c.strategy, list(RULE_TITLES).index(c.rule)))


def compare_figure(curves: list[Curve], title: str):
    """One panel per voting rule; in each, one line per (model, strategy)."""
    rules = [r for r in RULE_TITLES if any(c.rule == r for c in curves)]
    fig, axes = _figure(len(rules))
    for ax, rule in zip(axes, rules):
        for c in (c for c in curves if c.rule == rule):
            ns = sorted(c.points)
            ax.plot(ns, [c.points[n] for n in ns], marker="o", label=c.label)
        _axis(ax, RULE_TITLES[rule])
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def table(curves: list[Curve]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per curve, one column per n."""
    ns = sorted({n for c in curves for n in c.points})
    header = ["model", "strategy", "rule", *[f"n={n}" for n in ns]]
    rows = [[c.model, c.strategy, c.rule, *[f"{c.points[n]:.3f}" if n in c.points else "" for n in ns]] for c in curves]
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows])


def compare(experiment: str, model: str | None, output: str) -> tuple[list[Curve], str, str]:
    """Draw, write the PNG, log it (and the table) to a compare run of the experiment.
    Returns (curves, the table as text, the compare run id)."""
    from . import tracking

    curves = collect(experiment, model)
    fig = compare_figure(curves, f"{experiment}" + (f" ({model})" if model else ""))
    fig.savefig(output, dpi=120)
    header, rows = table(curves)
    run_id = tracking.create_compare_run(experiment, {tracking.TAG_MODEL: model} if model else {})
    tracking.log_figure(run_id, fig, tracking.COMPARE_PLOT)
    tracking.log_table(run_id, [dict(zip(header, r)) for r in rows], tracking.COMPARE_TABLE)
    tracking.set_status(run_id, "FINISHED")
    return curves, format_table(header, rows), run_id
