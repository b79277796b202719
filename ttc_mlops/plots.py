"""Figures and tables of accuracy against the test-time budget N (log2 axis), per strategy and voting rule.

    python -c "from ttc_mlops.plots import run_figure; run_figure([{'n': 1, 'level': 'all', 'pass': 0.5}], 'x').savefig('a.png')"

One evaluated run: a line per voting rule (`run_figure`). An experiment: one panel per rule, a line
per (policy model, strategy) (`compare_figure`), as in the test-time compute papers; `ttc compare`
(ttc_mlops.pipeline.compare) collects the curves from MLflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .names import M_ACC_MAJ, M_ACC_NAIVE, M_ACC_WEIGHTED, M_PASS

log = logging.getLogger(__name__)

RULE_TITLES = {M_ACC_NAIVE: "naive (best score)", M_ACC_WEIGHTED: "weighted vote",
               M_ACC_MAJ: "majority vote", M_PASS: "pass@n (any correct)"}


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols + 2.4, 3.6), squeeze=False, sharey=True)
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
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the data
    fig.tight_layout()
    return fig


@dataclass
class Curve:
    model: str
    strategy: str
    rule: str
    points: dict[int, float] = field(default_factory=dict)  # n -> accuracy
    source: dict[int, tuple[int, int]] = field(default_factory=dict)  # n -> (N of the run, start time)
    problem_sets: set[tuple[int, str]] = field(default_factory=set)  # (problems, digest) of its runs

    @property
    def label(self) -> str:
        return f"{self.model} {self.strategy}"


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
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the data
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def table(curves: list[Curve]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per curve, one column per n."""
    ns = sorted({n for c in curves for n in c.points})
    header = ["model", "strategy", "rule", "problems", "problem set", *[f"n={n}" for n in ns]]
    rows = [[c.model, c.strategy, c.rule, "/".join(str(k) for k, _ in sorted(c.problem_sets)),
             "/".join(d for _, d in sorted(c.problem_sets)),
             *[f"{c.points[n]:.3f}" if n in c.points else "" for n in ns]] for c in curves]
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows])
