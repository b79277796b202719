"""Compute-optimal search: a small best-of-N probe bins each problem's difficulty, the bin's strategy spends the rest.

    ttc run recipes/SmolLM2-135M-Instruct/compute_optimal.yaml --set optimal_table=<run id of `ttc optimal`> n=8

Applies a table chosen by `ttc optimal` (Snell et al. 2024: the best strategy and settings per
difficulty bin and budget). Per problem:

- probe: `probe_n` best-of-N samples, with the settings of the best-of-N run the table's bins were
  measured on, scored by the PRM; their mean aggregated score is the model-based difficulty (no
  gold answer), binned by the table's thresholds;
- route: the bin's configuration at the largest budget of the table that fits in what the probe
  left (n - probe_n completions, or flops_budget minus the probe's FLOPs), run for every problem
  of that route together (one batched search per route);
- record: the route's completions, then the probe's (they were paid for, so they vote too), in one
  group: the route was chosen for the whole budget and is never subsampled to a smaller n. The
  first note (`route_of`) holds the bin, the probe's score and the route taken.

Route searches use the recipe's seed (a route reproduces the sweep's run of its configuration);
the probe draws from its own seed, so its samples are not the route's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import RecipeError, build_recipe
from ..data import Problem
from ..difficulty import bin_of
from ..routing import check_table, route_for, table_path
from ..policy import Policy
from ..prm import PRM
from ..records import Record
from ..strategies import STRATEGIES
from .best_of_n import best_of_n
from .common import make_record, sample_seed

NOTE = "compute_optimal "  # the record note that holds the route, as JSON after this prefix
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def compute_optimal(problems: list[Problem], policy: Policy, prm: PRM, recipe) -> list[Record]:
    table = load_table(recipe.optimal_table)
    diff = table["difficulty"]
    routes = _routes(table, recipe)  # bin -> (table budget, route): checked before anything is generated

    # probe: a few best-of-N samples per problem, scored by the PRM, bin each problem (no gold)
    probe_recipe = _sub_recipe(recipe, {**diff["probe"], "n": recipe.probe_n},
                               sample_seed(recipe.seed, "compute_optimal/probe"))
    probes = best_of_n(problems, policy, prm, probe_recipe)
    scores = [sum(r.agg_scores) / len(r.agg_scores) for r in probes]
    bins = [bin_of(s, diff["edges"]) for s in scores]

    # route: each problem to its bin's configuration, searched together with the others of that route
    by_route: dict[str, list[int]] = {}
    for i, b in enumerate(bins):
        by_route.setdefault(json.dumps(routes[b][1]["settings"], sort_keys=True), []).append(i)
    searched: dict[int, Record] = {}
    for key, members in by_route.items():
        settings = json.loads(key)
        found = STRATEGIES[settings["approach"]]([problems[i] for i in members], policy, prm,
                                                 _sub_recipe(recipe, settings, recipe.seed))
        searched.update(zip(members, found))

    # select: the best-scored finished completion of route and probe together (make_record)
    return [_record(p, searched[i], probes[i], bins[i], scores[i], routes[bins[i]], table, recipe)
            for i, p in enumerate(problems)]


def load_table(source: str | None) -> dict:
    """The table of a `ttc optimal` run: a JSON file, or a run id whose table is kept locally."""
    if not source:
        raise RecipeError("approach=compute_optimal needs optimal_table: the run id of a `ttc optimal` run "
                          "(--set optimal_table=RUN_ID) or a path to its table.json")
    path = Path(source).expanduser()
    if not path.is_file():
        if not _RUN_ID.match(source):
            raise RecipeError(f"optimal_table={source!r} is neither a file nor the run id of a `ttc optimal` run")
        path = table_path(source)
        if not path.is_file():
            raise RecipeError(f"optimal_table={source!r}: the table of this `ttc optimal` run is not on this machine "
                              f"({path}); fetch it with `ttc fetch-table {source}`")
    try:
        table = json.loads(path.read_text())
        check_table(table, source)
    except (json.JSONDecodeError, ValueError) as err:
        raise RecipeError(f"optimal_table={source!r} ({path}): {err}") from None
    return table


def route_of(record: Record) -> dict | None:
    """The bin, probe score and route a compute_optimal record took (None: not such a record)."""
    note = next((n for n in record.notes if n.startswith(NOTE)), None)
    return json.loads(note[len(NOTE):]) if note is not None else None


def check_routes(recipe) -> None:
    """Preflight: the table loads and every bin has a route within the budget (no model needed)."""
    _routes(load_table(recipe.optimal_table), recipe)


def _routes(table: dict, recipe) -> dict[int, tuple[float, dict]]:
    """Bin -> (the table's budget used, the route), within what the probe leaves of the budget."""
    probe_n = recipe.probe_n
    if table["axis"] == "flops":
        if recipe.flops_budget is None:
            raise RecipeError(f"optimal_table={recipe.optimal_table!r} was chosen against FLOPs: set flops_budget "
                              f"(FLOPs per problem, the probe's included)")
        remaining = recipe.flops_budget - probe_n * table["difficulty"]["probe_cost"]
    else:
        remaining = recipe.n - probe_n
    routes = {}
    for b in range(1, table["difficulty"]["bins"] + 1):
        found = route_for(table, b, remaining, recipe.n - probe_n)
        if found is None:
            smallest = min(row["budget"] for row in table["budgets"])
            budget = f"flops_budget={recipe.flops_budget:g}" if table["axis"] == "flops" else f"n={recipe.n}"
            raise RecipeError(f"{budget} with probe_n={probe_n} leaves {remaining:g} for the route of bin {b}, and "
                              f"n={recipe.n} caps it at {recipe.n - probe_n} completions; the table's smallest "
                              f"budget is {smallest:g}: raise the budget or lower probe_n")
        routes[b] = found
    return routes


def _sub_recipe(recipe, settings: dict, seed: int):
    data = {**recipe.model_dump(), **settings, "seed": seed}
    return build_recipe(data, source=f"optimal_table={recipe.optimal_table!r} ({settings.get('approach')} route)")


def _record(problem: Problem, route: Record, probe: Record, b: int, score: float, chosen: tuple[float, dict],
            table: dict, recipe) -> Record:
    k, p = len(route.completions), len(probe.completions)
    budget, r = chosen
    note = {"bin": b, "bins": table["difficulty"]["bins"], "probe_n": p, "probe_score": round(score, 6),
            "table_budget": budget, "config": r["config"], "strategy": r["settings"]["approach"],
            "n": r["settings"]["n"], "fallback": r["fallback"], "table": table.get("run_id"),
            "route_completions": [0, k], "probe_completions": [k, k + p]}
    finished = route.finished if len(route.finished) == k else [True] * k
    return make_record(problem, recipe, route.completions + probe.completions, route.step_scores + probe.step_scores,
                       route.completion_tokens + probe.completion_tokens, route.finish_reasons + probe.finish_reasons,
                       groups=[0] * (k + p), tree=route.tree, notes=[NOTE + json.dumps(note), *route.notes],
                       finished=finished + [True] * p)
