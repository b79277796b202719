"""The compute_optimal strategy with fakes: a best-of-N probe bins each problem by its PRM scores, the
bin's route spends the rest of the budget; and, marked e2e, the whole path on the embedded model:
sweep -> `ttc optimal` -> compute_optimal run -> evaluate -> registry."""

import json

import pytest
from fakes import FakePolicy, FakePRM

from ttc_mlops.config import Recipe, RecipeError
from ttc_mlops.data import Problem
from ttc_mlops.strategies import STRATEGIES
from ttc_mlops.search.compute_optimal import compute_optimal, route_of

PROBLEMS = [Problem("easy", "What is 2 + 3?", "5"), Problem("mid", "What is 7 x 8?", "56"),
            Problem("hard", "What is 3^4?", "81")]
SCORE = {"easy": 0.9, "mid": 0.5, "hard": 0.2}  # every step of a problem's solutions scores this


def script():
    return {p.problem: [f"Step one.[s={SCORE[p.problem_id]}]\n\nSo \\boxed{{{p.answer}}}[s={SCORE[p.problem_id]}]",
                        f"Step two.[s={SCORE[p.problem_id]}]\n\nSo \\boxed{{0}}[s={SCORE[p.problem_id]}]"]
            for p in PROBLEMS}


def route(approach, n, cost=None, **settings):
    return {"config": f"{approach}", "settings": {"approach": approach, "n": n, "max_tokens": 32, **settings},
            "cost": cost if cost is not None else n, "bin_accuracy": 1.0, "problems": 3, "fallback": False,
            "run_id": None}


def table(axis="n", kind="model", probe_cost=1.0, rows=None):
    rows = rows or [
        (2, {1: route("best_of_n", 2), 2: route("best_of_n", 2), 3: route("best_of_n", 2)}),
        (4, {1: route("best_of_n", 1), 2: route("dvts", 4, beam_width=2, num_iterations=3),
             3: route("beam_search", 4, beam_width=2, num_iterations=3)}),
    ]
    return {"version": 1, "axis": axis, "rule": "acc_weighted", "run_id": None,
            "difficulty": {"kind": kind, "bins": 3, "edges": [0.7, 0.4], "probe_cost": probe_cost,
                           "probe": {"approach": "best_of_n", "max_tokens": 32, "temperature": 0.8, "agg_strategy": "last"}},
            "budgets": [{"budget": b, "accuracy": 1.0, "in_sample": 1.0, "routes": {str(k): v for k, v in r.items()}}
                        for b, r in rows]}


def recipe(tmp_path, data=None, **kw):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data or table()))
    return Recipe(**{"approach": "compute_optimal", "optimal_table": str(path), "n": 6, "probe_n": 2,
                     "agg_strategy": "last", **kw})


class SeedPolicy(FakePolicy):
    def __init__(self, script):
        super().__init__(script)
        self.seeds = []

    def generate(self, prompts, sampling, seeds):
        self.seeds.append(list(seeds))
        return super().generate(prompts, sampling, seeds)


def test_each_problem_takes_its_bins_route_with_what_the_probe_left(tmp_path):
    policy = SeedPolicy(script())
    records = STRATEGIES["compute_optimal"](PROBLEMS, policy, FakePRM(), recipe(tmp_path))
    routes = {r.problem_id: route_of(r) for r in records}
    # n=6 - probe_n=2 leaves 4: the budget-4 row; bins by the probe's mean PRM score (edges 0.7, 0.4)
    assert {pid: (r["bin"], r["strategy"], r["n"], r["table_budget"]) for pid, r in routes.items()} == {
        "easy": (1, "best_of_n", 1, 4), "mid": (2, "dvts", 4, 4), "hard": (3, "beam_search", 4, 4)}
    assert routes["mid"]["probe_score"] == pytest.approx(0.5)
    for r in records:
        k = routes[r.problem_id]["route_completions"][1]
        assert r.approach == "compute_optimal" and len(r.completions) == k + 2 <= 6
        assert routes[r.problem_id]["probe_completions"] == [k, k + 2]
        assert r.groups == [0] * len(r.completions)  # chosen for the whole budget: never subsampled
        assert r.selected is not None and r.finished[k:] == [True, True]
    assert not next(r for r in records if r.problem_id == "easy").tree  # best-of-N keeps no tree
    assert next(r for r in records if r.problem_id == "hard").tree  # beam search keeps its tree
    # the probe is one batched call for every problem, and draws from seeds no route uses
    assert len(policy.calls[0]) == 3 * 2
    assert not set(policy.seeds[0]) & {s for call in policy.seeds[1:] for s in call}


def test_a_smaller_budget_takes_a_smaller_row_and_results_do_not_depend_on_the_batch(tmp_path):
    records = compute_optimal(PROBLEMS, FakePolicy(script()), FakePRM(), recipe(tmp_path, n=4))
    assert {route_of(r)["table_budget"] for r in records} == {2}
    alone = compute_optimal(PROBLEMS[2:], FakePolicy(script()), FakePRM(), recipe(tmp_path, n=4))
    assert alone[0].completions == records[2].completions and alone[0].notes == records[2].notes


def test_a_flops_table_routes_within_flops_budget_and_n(tmp_path):
    rows = [(30.0, {b: route("best_of_n", 1, cost=30.0) for b in (1, 2, 3)}),
            (60.0, {b: route("best_of_n", 3, cost=60.0) for b in (1, 2, 3)})]
    data = table(axis="flops", probe_cost=10.0, rows=rows)
    records = compute_optimal(PROBLEMS, FakePolicy(script()), FakePRM(), recipe(tmp_path, data, flops_budget=100.0))
    assert {route_of(r)["table_budget"] for r in records} == {60.0}  # 100 - 2 x 10 leaves 80
    records = compute_optimal(PROBLEMS, FakePolicy(script()), FakePRM(),
                              recipe(tmp_path, data, flops_budget=100.0, n=3))  # n caps the route at 1 completion
    assert {route_of(r)["table_budget"] for r in records} == {30.0}
    with pytest.raises(RecipeError, match="chosen against FLOPs: set flops_budget"):
        compute_optimal(PROBLEMS, FakePolicy(script()), FakePRM(), recipe(tmp_path, data))


def test_what_cannot_be_applied_is_named_before_anything_is_generated(tmp_path):
    policy = FakePolicy(script())
    with pytest.raises(RecipeError, match="needs optimal_table"):
        compute_optimal(PROBLEMS, policy, FakePRM(), Recipe(approach="compute_optimal", n=6))
    with pytest.raises(RecipeError, match="oracle"):
        compute_optimal(PROBLEMS, policy, FakePRM(), recipe(tmp_path, table(kind="oracle")))
    with pytest.raises(RecipeError, match="n=3 with probe_n=2 leaves 1 for the route of bin 1"):
        compute_optimal(PROBLEMS, policy, FakePRM(), recipe(tmp_path, n=3))
    with pytest.raises(RecipeError, match="ttc fetch-table"):
        compute_optimal(PROBLEMS, policy, FakePRM(), Recipe(approach="compute_optimal", n=6, optimal_table="a" * 32))
    with pytest.raises(RecipeError, match="neither a file nor the run id"):
        compute_optimal(PROBLEMS, policy, FakePRM(), Recipe(approach="compute_optimal", n=6, optimal_table="nope"))
    assert policy.calls == []


def test_recipe_fields_of_compute_optimal():
    with pytest.raises(ValueError, match="probe_n=4 leaves nothing of n=4"):
        Recipe(approach="compute_optimal", n=4)
    co = Recipe(approach="compute_optimal", n=8, optimal_table="t.json")
    assert {"optimal_table", "probe_n", "flops_budget"} <= set(co.params()) and "beam_width" not in co.params()
    bon = Recipe(approach="best_of_n", n=4, optimal_table="t.json")
    assert "optimal_table" not in bon.params() and bon.search_key == Recipe(approach="best_of_n", n=4).search_key
    assert co.search_key != Recipe(approach="compute_optimal", n=8, optimal_table="u.json").search_key


@pytest.mark.e2e
def test_sweep_optimal_compute_optimal_evaluate_registry_on_the_embedded_model(mlflow_store, tmp_path, monkeypatch,
                                                                               embedded_dir):
    """The README's compute-optimal path with the real embedded model at tiny budgets (4 problems)."""
    from typer.testing import CliRunner

    from ttc_mlops import names
    from ttc_mlops.cli import app
    from ttc_mlops.pipeline import store

    monkeypatch.setenv("TTC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(embedded_dir.parent)  # the converted model, not again
    small = "num_samples=4 max_tokens=32 system_prompt= experiment_name=co-e2e search_batch_size=4"
    cli = CliRunner()
    for strategy, extra in (("best_of_n", "n=4"), ("dvts", "n=4 beam_width=2 num_iterations=2"),
                            ("beam_search", "n=4 beam_width=2 num_iterations=2")):
        out = cli.invoke(app, ["run", str(_recipe(strategy)), "--overrides", f"{small} {extra}", "--no-progress"])
        assert out.exit_code == 0, out.output
    out = cli.invoke(app, ["optimal", "--experiment", "co-e2e", "--output", str(tmp_path / "co.png")])
    assert out.exit_code == 0, out.output
    assert "compute-optimal (2-fold CV)" in out.output and (tmp_path / "co.png").is_file()
    run_id = next(line.split("table=")[1].split()[0] for line in out.output.splitlines() if "table=" in line)
    out = cli.invoke(app, ["run", str(_recipe("compute_optimal")), "--overrides",
                           f"{small} n=4 probe_n=2 optimal_table={run_id}", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "registered: models:/ttc-SmolLM2-135M-Instruct-compute_optimal/1" in out.output
    c = store.client()
    [version] = c.search_model_versions("name = 'ttc-SmolLM2-135M-Instruct-compute_optimal'")
    records = store.load_records(version.run_id, names.MERGED_RECORDS)
    assert len(records) == 4 and all(route_of(r)["table"] == run_id for r in records)
    assert c.get_run(version.run_id).data.params["optimal_table"] == run_id
    # the registered version applies the same table to new problems
    import mlflow.pyfunc
    import pandas as pd

    out = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").predict(
        pd.DataFrame({"problem": ["What is $2 + 3$?"]}))
    assert len(out) == 1 and out["completion"][0]


def _recipe(strategy):
    from conftest import REPO

    return REPO / "recipes" / "SmolLM2-135M-Instruct" / f"{strategy}.yaml"
