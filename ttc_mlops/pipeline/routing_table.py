"""`ttc optimal`: the compute-optimal curve of a sweep and the table that deploys it, from the evaluated parents of one policy.

    ttc optimal --experiment ttc-embedded --difficulty model

Reads the evaluated parent runs of one policy model on one problem set (every fixed strategy:
best_of_n, beam_search, dvts, at any N and settings), and per parent the outcome of every problem
at every n (`eval/outcomes.json`, graded from its merged records the first time, never from a
model). Difficulty comes from the best-of-N parent with the largest N (`eval/difficulty.json` on
it: pass@1 and mean PRM score per problem, and their bins). The selection and its two-fold
cross-validation are `ttc_mlops.routing`; this module logs the result to a `ttc.role=optimal` run
of the experiment: the table (`optimal/curve.json`), the figure, the chosen routes, the deployable
table (`optimal/table.json`, also kept under $TTC_CACHE/optimal/<run id>.json for the
compute_optimal strategy), and the curve as metrics (the voting rule's name, step = budget) so
that `mlflow ui` draws it beside the fixed strategies' parents.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .. import names
from ..difficulty import DEFAULT_BINS, KINDS, assign, from_table, measure
from ..difficulty import table as difficulty_table
from ..routing import (
    AXES,
    BudgetResult,
    Point,
    check_table,
    config_key,
    curve_rows,
    curve_table,
    dedupe,
    deployable_table,
    labels,
    optimal_figure,
    outcomes,
    route_budgets,
    route_rows,
    route_settings,
    routes_table,
    table_path,
)
from ..plots import format_table
from ..strategies import ROUTES
from ..voting import grade
from . import store
from .merge import MergeError, parent_recipe

log = logging.getLogger(__name__)

FIXED = ROUTES  # the strategies a route can take


class RoutingError(LookupError):
    """`ttc optimal` cannot go on; the message names the runs and what is missing."""


@dataclass
class RoutingRun:
    run_id: str
    results: list[BudgetResult]
    points: list[Point]
    names: dict[str, str]  # config key -> label
    table: dict  # the deployable table
    curve_text: str
    routes_text: str
    difficulty_run: str  # the best-of-N parent the bins come from
    table_file: Path  # the local copy the compute_optimal strategy reads


def build_routing_table(experiment: str, model: str | None = None, difficulty: str = "model", axis: str = "n",
            rule: str = names.M_ACC_WEIGHTED, bins: int = DEFAULT_BINS, cross_validate: bool = True,
            output: str = "compute_optimal.png", workers: int | None = None) -> RoutingRun:
    if difficulty not in KINDS:
        raise RoutingError(f"difficulty={difficulty!r} is not one of {KINDS}")
    if axis not in AXES:
        raise RoutingError(f"budget={axis!r} is not one of {AXES}")
    if rule not in names.VOTING_METRICS:
        raise RoutingError(f"rule={rule!r} is not one of {names.VOTING_METRICS}")
    runs = _parents(experiment, model)
    recipes = {}
    for run in runs:
        try:
            recipes[run.info.run_id] = parent_recipe(run.info.run_id)
        except MergeError as err:
            raise RoutingError(str(err)) from None
    _check_same(runs, recipes)
    graded: dict[str, list] = {}  # run id -> graded records, where they had to be graded

    # difficulty: the best-of-N parent with the most samples
    source = max((r for r in runs if r.data.tags.get(names.TAG_STRATEGY) == "best_of_n"),
                 key=lambda r: (int(r.data.tags.get(names.TAG_N, 0)), r.info.start_time), default=None)
    if source is None:
        raise RoutingError(f"experiment={experiment!r} has no evaluated best_of_n parent"
                           + (f" of model={model!r}" if model else "")
                           + ": difficulty is measured on a best-of-N run's samples; run and evaluate one")
    problems = from_table(_difficulty(source, recipes[source.info.run_id], graded, workers))
    bin_of_problem, thresholds = assign(problems, difficulty, bins)

    # points: every (configuration, n) measured, with its cost and per-problem outcome
    points = []
    for run in runs:
        rid, recipe = run.info.run_id, recipes[run.info.run_id]
        data = _outcomes(run, recipe, graded, workers)
        settings = route_settings(recipe)
        costs = _costs(run, data["n"], axis)
        for i, n in enumerate(data["n"]):
            correct = dict(zip(data["problem_ids"], (bool(v) for v in data["rules"][rule][i])))
            points.append(Point(config_key(settings), {**settings, "n": n}, n, costs[n], correct, rid))
    rank = {r.info.run_id: (int(r.data.tags.get(names.TAG_N, 0)), r.info.start_time) for r in runs}
    points = dedupe(points, rank)
    config_labels = labels({p.config: {k: v for k, v in p.settings.items() if k != "n"} for p in points})
    try:
        results = route_budgets(points, bin_of_problem, bins, cross_validate)
    except ValueError as err:
        raise RoutingError(f"experiment={experiment!r}: {err}") from None

    # log: a run of the experiment with the curve, the routes, the figure and the deployable table
    label = names.model_label_of(runs[0].data.tags.get(names.TAG_MODEL, "?"))
    title = f"{label}: compute-optimal ({difficulty} difficulty, {bins} bins, {rule})"
    run_id = _create_run(experiment, runs[0], difficulty, axis, rule, label)
    source_recipe = recipes[source.info.run_id]
    probe = {k: v for k, v in route_settings(source_recipe).items() if k != "n"}
    probe_cost = 1.0 if axis == "n" else _costs(source, [1], axis)[1]
    about = {"run_id": run_id, "experiment": experiment, "model_path": source_recipe.model_path,
             "prm_path": source_recipe.prm_path, "problem_set": runs[0].data.tags.get(names.TAG_PROBLEM_SET),
             "problems": len(bin_of_problem), "difficulty_run": source.info.run_id, "cross_validated": cross_validate}
    table = deployable_table(results, config_labels, axis=axis, rule=rule, kind=difficulty, nbins=bins, thresholds=thresholds,
                             probe=probe, probe_cost=probe_cost, about=about)
    curve_text = format_table(*curve_table(results, config_labels, axis, cross_validate))
    routes_text = format_table(*routes_table(results, config_labels, axis, bins))
    fig = optimal_figure(results, points, config_labels, axis, title, cross_validate)
    fig.savefig(output, dpi=120)
    store.log_figure(run_id, fig, names.OPTIMAL_PLOT)
    import matplotlib.pyplot as plt

    plt.close(fig)  # a long-lived process (a notebook, the tests) would keep every figure
    store.log_text(run_id, json.dumps(table, indent=1), names.OPTIMAL_TABLE)
    store.log_table(run_id, curve_rows(results, config_labels, cross_validate), names.OPTIMAL_CURVE)
    store.log_table(run_id, route_rows(results, config_labels), names.OPTIMAL_ROUTES)
    _log_curve(run_id, results, axis, rule)
    store.set_tags(run_id, {names.TAG_NOTE: _description(title, curve_text, routes_text, run_id, difficulty, source, axis)})
    store.set_status(run_id, "FINISHED")
    path = table_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return RoutingRun(run_id, results, points, config_labels, table, curve_text, routes_text, source.info.run_id, path)


def fetch_table(source: str) -> Path:
    """Make the table of a `ttc optimal` run (its run id) available where the compute_optimal strategy
    reads it; a file is only checked. Returns the local path."""
    path = Path(source).expanduser()
    if not path.is_file():
        try:
            store.get_run(source)
        except LookupError:
            raise RoutingError(f"table={source!r} is neither a file nor a run in {store.tracking_uri()}") from None
        text = store.load_run_text(source, names.OPTIMAL_TABLE)
        if text is None:
            raise RoutingError(f"run {source} has no {names.OPTIMAL_TABLE}: is it a `ttc optimal` run "
                               f"({names.TAG_ROLE}={names.ROLE_OPTIMAL})?")
        path = table_path(source)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    try:
        check_table(json.loads(path.read_text()), source)
    except (json.JSONDecodeError, ValueError) as err:
        raise RoutingError(f"{path}: {err}") from None
    return path


# --- reading the sweep

def _parents(experiment: str, model: str | None) -> list:
    runs = store.evaluated_parents(experiment, model)
    kept = []
    for r in runs:
        why = ("not a fixed strategy" if r.data.tags.get(names.TAG_STRATEGY) not in FIXED else
               "merged partially" if r.data.tags.get(names.TAG_MERGED) == names.MERGED_PARTIAL else None)
        if why:
            log.info("left out %s (%s): %s", r.data.tags.get(names.TAG_RUN_NAME, r.info.run_id), r.info.run_id, why)
        else:
            kept.append(r)
    runs = kept
    if not runs:
        raise RoutingError(f"experiment={experiment!r} has no evaluated parent runs of {FIXED}"
                           + (f" of model={model!r}" if model else "") + ": run a sweep and `ttc evaluate` it first")
    found = sorted({r.data.tags.get(names.TAG_MODEL, "?") for r in runs})
    if len(found) > 1:
        raise RoutingError(f"experiment={experiment!r} has evaluated parents of {len(found)} policy models {found}: "
                           f"choose one with --model (compute-optimal scaling is per policy)")
    sets = {}
    for r in runs:
        sets.setdefault(r.data.tags.get(names.TAG_PROBLEM_SET, "?"), []).append(r)
    if len(sets) > 1:
        lines = "\n  ".join(f"{r.data.tags.get(names.TAG_RUN_NAME, r.info.run_id)} ({r.info.run_id}): "
                            f"{r.data.tags.get(names.TAG_MERGED_PROBLEMS, '?')} problems, set {ps}"
                            for ps, rs in sets.items() for r in rs)
        raise RoutingError(f"experiment={experiment!r}: its evaluated parents graded {len(sets)} different problem sets; "
                           f"a selection per problem needs one set (run every configuration on the same problems):"
                           f"\n  {lines}")
    return sorted(runs, key=lambda r: (r.data.tags.get(names.TAG_STRATEGY), int(r.data.tags.get(names.TAG_N, 0)),
                                       r.info.start_time))


def _check_same(runs: list, recipes: dict) -> None:
    """Routes run with one policy and one PRM: the configurations may differ in search settings only."""
    for field in ("prm_path", "prm_family", "custom_chat_template"):
        values = {rid: getattr(r, field) for rid, r in recipes.items()}
        if len(set(values.values())) > 1:
            found = ", ".join(f"{rid}: {v!r}" for rid, v in values.items())
            raise RoutingError(f"the evaluated parents differ in {field} ({found}); a compute-optimal policy "
                               f"routes between configurations of one policy and one PRM: --model, or another experiment")


def _graded(run, recipe, graded: dict, workers: int | None):
    rid = run.info.run_id
    if rid not in graded:
        try:
            records = store.load_records(rid, names.MERGED_RECORDS)
        except ValueError as err:
            raise RoutingError(f"parent run {rid}: {err}") from None
        if records is None:
            raise RoutingError(f"parent run {rid} has no merged records: run `ttc merge --parent-run-id {rid}`")
        log.info("grading %s (%d problems) for its per-problem outcomes", run.data.tags.get(names.TAG_RUN_NAME, rid),
                 len(records))
        graded[rid] = grade(records, recipe.agg_strategy, workers)[0]
    return graded[rid]


def _cached(run, artifact: str, recipe) -> dict | None:
    """A JSON artifact of the parent, where it was computed from the records evaluate graded last."""
    text = store.load_run_text(run.info.run_id, artifact)
    if text is None:
        return None
    data = json.loads(text)
    fresh = data.get("evaluated") == run.data.tags.get(names.TAG_EVALUATED) and data.get("agg_strategy") == recipe.agg_strategy
    return data if fresh else None


def _outcomes(run, recipe, graded: dict, workers: int | None) -> dict:
    """Per rule, per n, per problem: right or not (eval/outcomes.json, written the first time)."""
    data = _cached(run, names.EVAL_OUTCOMES, recipe)
    if data is None:
        data = {"evaluated": run.data.tags.get(names.TAG_EVALUATED), "agg_strategy": recipe.agg_strategy,
                **outcomes(_graded(run, recipe, graded, workers), recipe.n)}
        store.log_text(run.info.run_id, json.dumps(data), names.EVAL_OUTCOMES)
    return data


def _difficulty(run, recipe, graded: dict, workers: int | None) -> dict:
    """Pass@1 and mean PRM score per problem, and their quintiles (eval/difficulty.json on the best-of-N parent)."""
    data = _cached(run, names.EVAL_DIFFICULTY, recipe)
    if data is None:
        data = {"evaluated": run.data.tags.get(names.TAG_EVALUATED), "agg_strategy": recipe.agg_strategy,
                "source_run": run.info.run_id, "n": recipe.n,
                **difficulty_table(measure(_graded(run, recipe, graded, workers)), DEFAULT_BINS)}
        store.log_text(run.info.run_id, json.dumps(data, indent=1), names.EVAL_DIFFICULTY)
    return data


def _costs(run, ns: list[int], axis: str) -> dict[int, float]:
    if axis == "n":
        return {n: float(n) for n in ns}
    flops = store.metric_steps(run.info.run_id, names.M_FLOPS_PER_PROBLEM)
    missing = [n for n in ns if n not in flops]
    if missing:
        raise RoutingError(f"parent run {run.info.run_id} ({run.data.tags.get(names.TAG_RUN_NAME)}) has no "
                           f"{names.M_FLOPS_PER_PROBLEM} at n={missing}: its chunks logged no `{names.M_FLOPS}` (run before "
                           f"compute was counted); use --budget n, or run it again")
    return {n: flops[n] for n in ns}


# --- logging

def _create_run(experiment: str, like, difficulty: str, axis: str, rule: str, label: str) -> str:
    tags = like.data.tags
    run = store.client().create_run(store.ensure_experiment(experiment), tags={
        names.TAG_ROLE: names.ROLE_OPTIMAL, names.TAG_RUN_NAME: f"optimal: {label} ({difficulty} difficulty, budget {axis})",
        names.TAG_MODEL: tags.get(names.TAG_MODEL, ""), names.TAG_PRM: tags.get(names.TAG_PRM, ""),
        names.TAG_DATASET: tags.get(names.TAG_DATASET, ""), names.TAG_PROBLEM_SET: tags.get(names.TAG_PROBLEM_SET, ""),
        names.TAG_STRATEGY: "compute_optimal", names.TAG_GROUP: f"{label}/compute-optimal (ttc optimal, {difficulty})",
        names.TAG_DIFFICULTY: difficulty, names.TAG_BUDGET_AXIS: axis, names.TAG_RULE: rule})
    return run.info.run_id


def _log_curve(run_id: str, results: list[BudgetResult], axis: str, rule: str) -> None:
    """The curve as metrics: on the n axis the rule's own name at step = n, so the UI's chart of that
    metric draws it beside the parents; on the FLOPs axis step k is the k-th budget, with
    `flops_per_problem` beside it (chart it with that metric as the x-axis)."""
    per_step = {}
    for k, r in enumerate(results):
        step = int(r.budget) if axis == "n" else k
        per_step[step] = {rule: r.accuracy, names.M_OPTIMAL_IN_SAMPLE: r.in_sample}
        if axis == "flops":
            per_step[step][names.M_FLOPS_PER_PROBLEM] = r.budget
    store.log_step_metrics(run_id, per_step)


def _description(title: str, curve_text: str, routes_text: str, run_id: str, difficulty: str, source,
                 axis: str) -> str:
    return "\n".join([
        f"**{title}**", "",
        "Accuracy at each budget: the compute-optimal policy (a configuration per difficulty bin, chosen on one "
        "half of the problems and scored on the other, both ways) against every fixed configuration.", "",
        "```", curve_text, "```", "", "Chosen per bin (on all problems; `*`: the bin had no problems):", "",
        "```", routes_text, "```", "",
        f"Difficulty: {difficulty}, from the best-of-N parent {source.info.run_id} (`{names.EVAL_DIFFICULTY}` there). "
        + (f"Deploy: `{deploy_command(run_id, axis)}`." if difficulty == "model" else
           "A deployment needs a table chosen with `--difficulty model` (no gold answer)."),
    ])


def deploy_command(run_id: str, axis: str) -> str:
    """How to apply the table of a `ttc optimal` run to new problems."""
    budget = "n=16" if axis == "n" else "n=64 flops_budget=<FLOPs per problem>"
    return f'mlflow run . -e compute_optimal --env-manager local -P table={run_id} -P set="{budget}"'
