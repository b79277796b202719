"""The strategy registry: every search strategy declared once, read by the config, names, search keys and routes.

    python -c "from ttc_mlops.strategies import STRATEGIES; print({s.name: s.fields for s in STRATEGIES.values()})"

A strategy is a function `(problems, policy, prm, recipe) -> list[Record]` in its own file under
`ttc_mlops/search/`, plus one `Strategy(...)` below: the recipe fields only it reads (so they are
left out of other strategies' parameters and search keys), its cross-field rules, how its budget
counts, whether its records carry a search tree, and whether `compute_optimal` may route to it.
Adding a strategy touches its file and this table; `Recipe.approach`, `Recipe.params`, run names,
compute-optimal routes and the progress bar all read it.

The function is named as "module:function" and imported when a search runs: the search code
imports the config, and the config reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

_STEP_FIELDS = ("num_iterations", "lookahead")


def _check_beams(recipe) -> None:
    if recipe.beam_width > recipe.n:
        raise ValueError(f"beam_width={recipe.beam_width} is larger than n={recipe.n}; "
                         f"{recipe.approach} keeps n / beam_width beams")
    if recipe.n % recipe.beam_width:
        raise ValueError(f"n={recipe.n} is not a multiple of beam_width={recipe.beam_width} "
                         f"({recipe.approach} splits n into n / beam_width beams)")


def _check_probe(recipe) -> None:
    if recipe.probe_n >= recipe.n:
        raise ValueError(f"probe_n={recipe.probe_n} leaves nothing of n={recipe.n} for the route (n counts a "
                         f"problem's completions, the probe's included)")


def _check_particles(recipe) -> None:
    if recipe.lookahead:
        raise ValueError(f"lookahead={recipe.lookahead} does not apply to particle_filtering (a particle's weight "
                         f"is its newest step's score); leave it at 0")
    if recipe.pg_iterations > 1 and recipe.pg_reference_particles >= recipe.n:
        raise ValueError(f"pg_reference_particles={recipe.pg_reference_particles} leaves no free particle of "
                         f"n={recipe.n} (particle Gibbs keeps that many from the previous sweep and resamples the rest)")


@dataclass(frozen=True)
class Strategy:
    name: str
    function: str  # "module:function", imported when a search runs
    budget: str  # what n counts, for people (the README and `ttc validate`)
    fields: tuple[str, ...] = ()  # recipe fields only this strategy (and others naming them) reads
    tree: bool = False  # its records carry a search tree (a TreeNode per sampled step)
    route: bool = True  # a fixed strategy that `compute_optimal` may route a difficulty bin to
    check: Callable[[object], None] | None = None  # cross-field rules; raises ValueError naming the fields
    suffix: Callable[[object], str] = lambda recipe: ""  # after "<model>-<approach>-n<N>" in run names
    # PRM rows per problem per iteration, what the progress bar counts; None: progress by sampled tokens
    rows: Callable[[object], int] | None = lambda recipe: 1

    def __call__(self, problems, policy, prm, recipe):
        module, _, name = self.function.partition(":")
        return getattr(import_module(module), name)(problems, policy, prm, recipe)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("best_of_n", "ttc_mlops.search.best_of_n:best_of_n", "n completions per problem, sampled independently",
             rows=None),
    Strategy("beam_search", "ttc_mlops.search.beam_search:beam_search",
             "n beams per problem (n / beam_width kept each step, each expanded beam_width times)",
             fields=("beam_width", *_STEP_FIELDS, "filter_duplicates", "sort_completed"), tree=True,
             check=_check_beams, suffix=lambda r: f"-m{r.beam_width}"),
    Strategy("dvts", "ttc_mlops.search.dvts:dvts",
             "n completions per problem: n / beam_width independent subtrees x beam_width candidates",
             fields=("beam_width", *_STEP_FIELDS), tree=True, check=_check_beams,
             suffix=lambda r: f"-m{r.beam_width}", rows=lambda r: r.subtrees),
    Strategy("particle_filtering", "ttc_mlops.search.particle_filtering:particle_filtering",
             "n particles per problem per sweep, pg_iterations sweeps (particle Gibbs when > 1)",
             fields=("num_iterations", "pf_temperature", "pf_selection", "pg_iterations", "pg_reference_particles"),
             tree=True, check=_check_particles,
             suffix=lambda r: f"-pg{r.pg_iterations}" if r.pg_iterations > 1 else "",
             rows=lambda r: r.pg_iterations),
    Strategy("compute_optimal", "ttc_mlops.search.compute_optimal:compute_optimal",
             "n completions per problem, the probe's included (or flops_budget FLOPs per problem)",
             fields=("optimal_table", "probe_n", "flops_budget"), route=False, check=_check_probe),
)}

ROUTES = tuple(name for name, s in STRATEGIES.items() if s.route)  # what a compute-optimal route can run


def strategy_fields() -> dict[str, tuple[str, ...]]:
    """Recipe field -> the strategies that read it, for the fields only some strategies read."""
    found: dict[str, tuple[str, ...]] = {}
    for s in STRATEGIES.values():
        for f in s.fields:
            found[f] = found.get(f, ()) + (s.name,)
    return found
