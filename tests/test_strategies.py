"""The strategy registry is the one place a strategy is declared: everything else reads it.

    python -m pytest -q tests/test_strategies.py
"""

from pathlib import Path
from typing import get_args

import yaml

from ttc_mlops import routing
from ttc_mlops.config import STRATEGY_FIELDS, Recipe, load_recipe
from ttc_mlops.strategies import ROUTES, STRATEGIES, Strategy

REPO = Path(__file__).resolve().parent.parent


def test_the_recipe_approach_is_the_registry():
    assert get_args(Recipe.model_fields["approach"].annotation) == tuple(STRATEGIES)
    assert all(isinstance(s, Strategy) and s.name == name for name, s in STRATEGIES.items())


def test_every_declared_field_is_a_recipe_field_and_only_its_strategies_read_it():
    for s in STRATEGIES.values():
        assert set(s.fields) <= set(Recipe.model_fields), s.name
    for field, readers in STRATEGY_FIELDS.items():
        for name in STRATEGIES:
            params = Recipe(approach=name, n=8, beam_width=2).params()
            assert (field in params) == (name in readers), (field, name)


def test_every_strategy_has_a_function_an_entry_point_and_an_embedded_recipe():
    project = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    for name, s in STRATEGIES.items():
        module, _, function = s.function.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), s.function
        assert name in project and f"approach={name}" in project[name]["command"], name
        default = project[name]["parameters"]["recipe"]["default"]
        assert load_recipe(REPO / default).approach == name


def test_routes_and_route_fields_come_from_the_registry():
    assert set(ROUTES) == {n for n, s in STRATEGIES.items() if s.route} and "compute_optimal" not in ROUTES
    for name in ROUTES:
        assert set(STRATEGIES[name].fields) <= set(routing.ROUTE_FIELDS), name


def test_adding_a_strategy_is_one_registration(tmp_path):
    """A new entry is enough for the config, parameters, search keys, run names and the run loop to
    know it (in a fresh interpreter: the recipe's approach is fixed when the config is imported)."""
    import subprocess
    import sys

    script = """
from ttc_mlops import strategies
strategies.STRATEGIES["greedy"] = strategies.Strategy(
    "greedy", "ttc_mlops.search.best_of_n:best_of_n", "1 completion", fields=("beam_width",),
    suffix=lambda r: f"-m{r.beam_width}")
import sys
sys.path.insert(0, "tests")
from fakes import FakePolicy, FakePRM
import ttc_mlops as ttc
from ttc_mlops import names
from ttc_mlops.data import Problem
r = ttc.Recipe(approach="greedy", beam_width=3, n=2)
assert "beam_width" in r.params() and "num_iterations" not in r.params()
assert r.search_key != ttc.Recipe(approach="best_of_n", n=2).search_key
[record] = ttc.run_search(r, [Problem("p", "P", "1")], FakePolicy({"P": ["so \\\\boxed{1}"]}), FakePRM())
print(names.run_name(r), record.approach, record.pred)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["Llama-3.2-1B-Instruct-greedy-n2-m3", "greedy", "1"]
