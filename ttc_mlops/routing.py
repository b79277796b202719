"""Compute-optimal scaling: per difficulty bin and budget, the best (strategy, settings), chosen on one half of the problems and scored on the other.

    python -c "import ttc_mlops.routing as o; print(o.folds({'a': 1, 'b': 1, 'c': 2, 'd': 2}))"

Pure computation over what a sweep measured (no model, no MLflow; `ttc optimal`,
ttc_mlops.pipeline.routing_table, feeds it from the evaluated parent runs). A *point* is one
configuration (strategy and settings) at one budget n, with its cost per problem (n, or FLOPs) and,
per problem, whether the voting rule picked a right answer there.

At a budget B the compute-optimal policy of Snell et al. (2024) picks, for every difficulty bin, the
point with cost <= B that is most accurate on that bin's problems (ties: the cheaper, then the
configuration's name; a bin with no problems takes the point best on all of them). Chosen and
scored on the same problems, that accuracy is biased upwards (the maximum of noisy estimates), so
the curve is two-fold cross-validated as in the paper: choose on one half of the problems, score
the other half, swap, and count every problem once. The table a deployment applies (`routes`) is
chosen on all problems. A fixed strategy at budget B is its most expensive point with cost <= B.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from .names import VOTING_METRICS
from .records import Record
from .strategies import ROUTES, STRATEGIES
from .voting import Graded, budgets, choose, subset

AXES = ("n", "flops")  # the budget: completions per problem, or FLOPs per problem
# the fields that make a configuration: what a route of the compute_optimal strategy runs with
ROUTE_FIELDS = ("approach", "n", *dict.fromkeys(f for name in ROUTES for f in STRATEGIES[name].fields),
                "agg_strategy", "temperature", "top_p", "max_tokens", "system_prompt")
SHORT = {"beam_width": "m", "num_iterations": "iters", "lookahead": "k", "filter_duplicates": "dedup",
         "sort_completed": "sorted", "agg_strategy": "agg", "temperature": "T", "max_tokens": "tokens",
         "system_prompt": "prompt"}


# --- what a sweep measured

def route_settings(recipe) -> dict:
    """The fields of a recipe that its strategy reads and that make it a configuration (n included)."""
    return {k: v for k, v in recipe.params().items() if k in ROUTE_FIELDS}


def config_key(settings: dict) -> str:
    """A configuration's identity: its settings without n."""
    return json.dumps({k: v for k, v in settings.items() if k != "n"}, sort_keys=True)


def labels(settings: dict[str, dict]) -> dict[str, str]:
    """config key -> a short name: the strategy, and the settings that differ between its configurations."""
    by_strategy: dict[str, list[str]] = {}
    for key, s in settings.items():
        by_strategy.setdefault(s["approach"], []).append(key)
    out = {}
    for strategy, keys in by_strategy.items():
        fields = sorted({f for k in keys for f in settings[k]} - {"approach", "n"})
        varying = [f for f in fields if len({json.dumps(settings[k].get(f)) for k in keys}) > 1]
        for k in keys:
            parts = [f"{SHORT.get(f, f)}={_short(settings[k].get(f))}" for f in varying]
            if "beam_width" in settings[k] and "beam_width" not in varying:  # M is the point of these strategies
                parts.insert(0, f"m={settings[k]['beam_width']}")
            out[k] = " ".join([strategy, *parts])
    return out


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 16 else "#" + hashlib.sha256(text.encode()).hexdigest()[:6]


def outcomes(graded: list[Graded], max_n: int) -> dict:
    """Per voting rule, per budget n (as `ttc evaluate` measures them: 1, 2, 4, ..., whole groups
    only), per problem: 1 where the rule picks a right answer. What `eval/outcomes.json` holds."""
    largest = max(len(g.scores) for g in graded)
    ns = [n for n in budgets(min(max_n, largest)) if all(subset(g, n) for g in graded)]
    rules: dict[str, list[list[int]]] = {m: [] for m in VOTING_METRICS}
    for n in ns:
        chosen = [choose(g, subset(g, n)) for g in graded]
        for m in VOTING_METRICS:
            rules[m].append([int(c[m]) for c in chosen])
    return {"problem_ids": [g.record.problem_id for g in graded], "n": ns, "rules": rules}


def budget_share(records: list[Record], n: int) -> float:
    """The share of a run's work that voting at n keeps, averaged over problems: the groups a
    problem's first n completions hold (whole groups only) over all its groups. Best-of-N at n of N
    keeps n / N; DVTS keeps n / N of its subtrees; beam search (one group) keeps all or nothing.
    An estimate of cost at n that assumes every group costs the same and shares nothing with the
    others (with prefix reuse the prompt is run once for all, so at n < N it overstates a little)."""
    shares = []
    for r in records:
        groups = r.groups if len(r.groups) == len(r.completions) else list(range(len(r.completions)))
        counts = Counter(groups)
        sizes = [counts[g] for g in dict.fromkeys(groups)]  # in the order the groups were produced
        kept, total = 0, 0
        for size in sizes:
            if total + size > n:
                break
            total += size
            kept += 1
        shares.append(kept / len(sizes) if sizes else 1.0)
    return sum(shares) / len(shares) if shares else 1.0


@dataclass
class Point:
    config: str  # config_key of its settings
    settings: dict  # route settings, n included
    n: int
    cost: float  # per problem, in the budget's unit
    correct: dict[str, bool]  # problem id -> the voting rule picked a right answer
    run_id: str | None = None  # the parent run it was measured in

    @property
    def strategy(self) -> str:
        return self.settings["approach"]

    def accuracy(self, problems: list[str]) -> float:
        return sum(self.correct[p] for p in problems) / len(problems)


def dedupe(points: list[Point], rank: dict[str, tuple]) -> list[Point]:
    """One point per (configuration, n): where runs of one configuration measured the same n (N=16
    and N=64 runs, both at n=4), the run ranked highest (`rank[run_id]`, e.g. (N, start time))."""
    best: dict[tuple[str, int], Point] = {}
    for p in points:
        k = (p.config, p.n)
        if k not in best or rank.get(p.run_id, ()) > rank.get(best[k].run_id, ()):
            best[k] = p
    return sorted(best.values(), key=lambda p: (p.config, p.n))


# --- selection

@dataclass
class Choice:
    point: Point
    accuracy: float  # on the problems it was chosen on (this bin's, or all where the bin had none)
    problems: int  # problems of the bin it was chosen on
    fallback: bool  # the bin had no problems: chosen on all of them


def folds(bins: dict[str, int]) -> dict[str, int]:
    """Two folds over problems, balanced within each bin: problems ordered by (bin, a hash of the
    id) alternate between fold 0 and 1, so each fold holds about half of every bin. Deterministic."""
    order = sorted(bins, key=lambda p: (bins[p], hashlib.sha256(p.encode()).hexdigest()))
    return {p: i % 2 for i, p in enumerate(order)}


def _best(points: list[Point], problems: list[str]) -> tuple[Point, float]:
    scored = [(p.accuracy(problems), p) for p in points]
    acc, point = min(scored, key=lambda ap: (-ap[0], ap[1].cost, ap[1].config, ap[1].n))
    return point, acc


def select(points: list[Point], bins: dict[str, int], problems: list[str], budget: float,
           nbins: int) -> dict[int, Choice]:
    """Bin -> the affordable point most accurate on that bin's `problems` (every bin 1..nbins)."""
    affordable = [p for p in points if p.cost <= budget * (1 + 1e-9)]
    if not affordable or not problems:
        return {}
    overall, overall_acc = _best(affordable, problems)
    chosen = {}
    for b in range(1, nbins + 1):
        members = [p for p in problems if bins[p] == b]
        if members:
            point, acc = _best(affordable, members)
            chosen[b] = Choice(point, acc, len(members), False)
        else:
            chosen[b] = Choice(overall, overall_acc, 0, True)
    return chosen


def fixed_at(points: list[Point], budget: float) -> Point | None:
    """A fixed configuration at budget B: its most expensive point that costs <= B."""
    affordable = [p for p in points if p.cost <= budget * (1 + 1e-9)]
    return max(affordable, key=lambda p: (p.cost, p.n)) if affordable else None


@dataclass
class BudgetResult:
    budget: float
    accuracy: float  # the compute-optimal curve: cross-validated (or in-sample where disabled)
    in_sample: float  # chosen and scored on all problems: optimistic
    routes: dict[int, Choice]  # the table to deploy: chosen on all problems
    fixed: dict[str, float | None]  # config -> a fixed strategy's accuracy at this budget (None: too costly)
    fold_routes: list[dict[int, Choice]] = field(default_factory=list)  # chosen on fold 0, on fold 1


def route_budgets(points: list[Point], bins: dict[str, int], nbins: int,
                    cross_validate: bool = True) -> list[BudgetResult]:
    """The compute-optimal curve and table at every budget a point costs, and every fixed configuration's
    accuracy there. `bins`: problem id -> difficulty bin (1..nbins); every point must cover them all."""
    problems = sorted(bins)
    if cross_validate and len(problems) < 2:
        raise ValueError(f"cross-validation needs at least 2 problems, got {len(problems)}")
    for p in points:
        missing = [q for q in problems if q not in p.correct]
        if missing:
            raise ValueError(f"{p.config} at n={p.n} (run {p.run_id}) has no outcome for {len(missing)} of the "
                             f"{len(problems)} problems (e.g. {missing[0]!r}): points must cover one problem set")
    fold = folds(bins)
    halves = [[q for q in problems if fold[q] == f] for f in (0, 1)]
    by_config: dict[str, list[Point]] = {}
    for p in points:
        by_config.setdefault(p.config, []).append(p)
    results = []
    for budget in sorted({p.cost for p in points}):
        routes = select(points, bins, problems, budget, nbins)
        in_sample = sum(routes[bins[q]].point.correct[q] for q in problems) / len(problems)
        fold_routes, accuracy = [], in_sample
        if cross_validate:
            fold_routes = [select(points, bins, halves[f], budget, nbins) for f in (0, 1)]
            right = sum(fold_routes[f][bins[q]].point.correct[q] for f in (0, 1) for q in halves[1 - f])
            accuracy = right / len(problems)
        fixed = {}
        for config, own in by_config.items():
            at = fixed_at(own, budget)
            fixed[config] = at.accuracy(problems) if at is not None else None
        results.append(BudgetResult(budget, accuracy, in_sample, routes, fixed, fold_routes))
    return results


# --- tables and figure, for people

def budget_label(budget: float, axis: str) -> str:
    return f"n={budget:g}" if axis == "n" else f"{budget:.3g}"


def curve_rows(results: list[BudgetResult], names: dict[str, str], cross_validated: bool) -> list[dict]:
    """One row per budget: the compute-optimal accuracy, in-sample, and every fixed configuration's."""
    rows = []
    for r in results:
        row = {"budget": r.budget, "compute_optimal": r.accuracy}
        if cross_validated:
            row["compute_optimal_in_sample"] = r.in_sample
        row.update({names[c]: v for c, v in sorted(r.fixed.items(), key=lambda cv: names[cv[0]])})
        rows.append(row)
    return rows


def route_rows(results: list[BudgetResult], names: dict[str, str]) -> list[dict]:
    """One row per (budget, bin): the chosen configuration, its settings and what it scored."""
    return [{"budget": r.budget, "bin": b, "problems": c.problems, "config": names[c.point.config],
             "strategy": c.point.strategy, "n": c.point.n, "cost": c.point.cost, "bin_accuracy": c.accuracy,
             "fallback": c.fallback} for r in results for b, c in sorted(r.routes.items())]


def curve_table(results: list[BudgetResult], names: dict[str, str], axis: str,
                cross_validated: bool) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per curve, one column per budget."""
    header = ["curve", *[budget_label(r.budget, axis) for r in results]]

    def cells(values):
        return ["" if v is None else f"{v:.3f}" for v in values]

    rows = [["compute-optimal" + (" (2-fold CV)" if cross_validated else " (in-sample)"),
             *cells(r.accuracy for r in results)]]
    if cross_validated:
        rows.append(["compute-optimal, in-sample (optimistic)", *cells(r.in_sample for r in results)])
    for config in sorted(names, key=names.get):
        rows.append([names[config], *cells(r.fixed.get(config) for r in results)])
    return header, rows


def routes_table(results: list[BudgetResult], names: dict[str, str], axis: str,
                 nbins: int) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per budget, the configuration chosen for each bin (* chosen on all
    problems: the bin had none)."""
    header = ["budget", *[f"bin {b}" for b in range(1, nbins + 1)]]
    rows = [[budget_label(r.budget, axis),
             *[f"{names[c.point.config]} n={c.point.n}" + ("*" if c.fallback else "") for _, c in sorted(r.routes.items())]]
            for r in results]
    return header, rows


def optimal_figure(results: list[BudgetResult], points: list[Point], names: dict[str, str], axis: str,
                   title: str, cross_validated: bool):
    """Accuracy against budget: a line per fixed configuration (its measured points), the
    compute-optimal curve over them, and (dashed) its optimistic in-sample version."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    problems = sorted(next(iter(points)).correct) if points else []
    for config in sorted(names, key=names.get):
        own = sorted((p for p in points if p.config == config), key=lambda p: p.cost)
        ax.plot([p.cost for p in own], [p.accuracy(problems) for p in own], marker="o", alpha=0.8, label=names[config],
                zorder=3)  # above the compute-optimal line where they coincide
    xs = [r.budget for r in results]
    ax.plot(xs, [r.accuracy for r in results], color="black", linewidth=3.2, marker="s", markersize=7, zorder=2,
            label="compute-optimal" + (" (2-fold CV)" if cross_validated else " (in-sample)"))
    if cross_validated:
        ax.plot(xs, [r.in_sample for r in results], color="grey", linestyle="--", linewidth=1.2,
                label="compute-optimal, in-sample (optimistic)")
    ax.set_xscale("log", base=2 if axis == "n" else 10)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # unlabelled minor ticks: no overlap
    ax.set_xlabel("N (completions per problem)" if axis == "n" else "FLOPs per problem")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the data
    fig.suptitle(title, fontsize=10)  # over the whole figure: the legend narrows the axes
    fig.tight_layout()
    return fig


# --- the deployable table: what `ttc optimal` logs and the compute_optimal strategy applies

TABLE_VERSION = 1
TABLE_DIR = "optimal"  # under $TTC_CACHE: local copies of logged tables, by run id


def table_path(run_id: str):
    """Where the table of a `ttc optimal` run is kept on this machine (`ttc optimal` writes it there,
    `ttc fetch-table RUN_ID` downloads it)."""
    from .models import cache_dir

    return cache_dir() / TABLE_DIR / f"{run_id}.json"


def deployable_table(results: list[BudgetResult], names: dict[str, str], *, axis: str, rule: str, kind: str,
                     nbins: int, thresholds: list[float], probe: dict, probe_cost: float, about: dict) -> dict:
    """Per budget, bin -> (strategy, settings) chosen on all problems; with what a deployment needs to
    bin a new problem: the model-based thresholds, the probe's settings (those of the best-of-N run the
    thresholds come from) and what one probe sample costs in the budget's unit."""
    return {
        "version": TABLE_VERSION, "axis": axis, "rule": rule, **about,
        "difficulty": {"kind": kind, "bins": nbins, "edges": thresholds, "probe": probe, "probe_cost": probe_cost},
        "budgets": [{"budget": r.budget, "accuracy": r.accuracy, "in_sample": r.in_sample,
                     "routes": {str(b): {"config": names[c.point.config], "settings": c.point.settings,
                                         "cost": c.point.cost, "bin_accuracy": c.accuracy, "problems": c.problems,
                                         "fallback": c.fallback, "run_id": c.point.run_id}
                                for b, c in sorted(r.routes.items())}} for r in results],
    }


def check_table(table: dict, source: str) -> None:
    """A table the strategy can apply, or ValueError naming what is wrong."""
    def bad(what: str):
        raise ValueError(f"optimal_table={source!r}: {what}")

    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION:
        bad(f"not a `ttc optimal` table of version {TABLE_VERSION}")
    if table.get("axis") not in AXES:
        bad(f"axis={table.get('axis')!r} is not one of {AXES}")
    diff = table.get("difficulty") or {}
    if diff.get("kind") != "model":
        bad(f"its bins are {diff.get('kind')!r} difficulty, which needs the gold answer; a deployment bins a problem "
            f"by its PRM scores alone: choose the table with `ttc optimal --difficulty model`")
    nbins, cuts = diff.get("bins"), diff.get("edges")
    if not isinstance(nbins, int) or not isinstance(cuts, list) or len(cuts) != nbins - 1:
        bad(f"difficulty.bins={nbins!r} needs bins - 1 edges, got {cuts!r}")
    if not isinstance(diff.get("probe"), dict) or diff["probe"].get("approach") != "best_of_n":
        bad("difficulty.probe must hold the best-of-N settings the bins were measured with")
    if not table.get("budgets"):
        bad("it has no budgets")
    for row in table["budgets"]:
        missing = [b for b in range(1, nbins + 1) if str(b) not in row.get("routes", {})]
        if missing:
            bad(f"budget {row.get('budget')} has no route for bins {missing}")


def route_for(table: dict, b: int, remaining: float, max_n: int) -> tuple[float, dict] | None:
    """(the table's budget used, the route) for bin b: the route of the largest budget that fits in
    `remaining` and runs at most `max_n` completions; None where nothing fits."""
    for row in sorted(table["budgets"], key=lambda r: -r["budget"]):
        route = row["routes"][str(b)]
        if row["budget"] <= remaining * (1 + 1e-9) and route["settings"]["n"] <= max_n:
            return row["budget"], route
    return None
