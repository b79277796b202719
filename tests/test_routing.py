"""Compute-optimal scaling: difficulty bins, selection per bin and budget, two-fold cross-validation,
FLOPs per problem in evaluate, and `ttc optimal` over evaluated parents (fakes, a real SQLite store)."""

import json
import random

import pytest
from fakes import FakePolicy, FakePRM
from typer.testing import CliRunner

from ttc_mlops import names
from ttc_mlops.cli import app
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.difficulty import assign, bin_of, edges, measure
from ttc_mlops.records import Record
from ttc_mlops.routing import (
    Point,
    budget_share,
    check_table,
    config_key,
    deployable_table,
    folds,
    labels,
    outcomes,
    route_budgets,
    route_for,
)
from ttc_mlops.voting import grade

BON = {"approach": "best_of_n"}
BEAM = {"approach": "beam_search", "beam_width": 2}


def record(pid: str, completions: list[tuple[str, float]], groups: list[int] | None = None, approach="best_of_n"):
    """A problem whose gold answer is 5; each completion (answer, PRM score) is one step."""
    return Record(problem_id=pid, problem=f"problem {pid}", answer="5", level=None, subject=None,
                  completions=[f"So \\boxed{{{a}}}" for a, _ in completions], step_scores=[[s] for _, s in completions],
                  agg_scores=[s for _, s in completions], completion_tokens=[4] * len(completions),
                  finish_reasons=["eos"] * len(completions), selected=0, pred=None, approach=approach,
                  agg_strategy="last", groups=groups if groups is not None else list(range(len(completions))))


# --- the synthetic sweep whose optimum is known by construction: 5 bins of 6 problems; best-of-N
# right on the easy bins (1-2 from n=1, bin 3 from n=2), beam search right on the hard ones (bin 5
# from n=2, bin 4 from n=4). Bin b's samples score SCORE[b] (model difficulty = the bins).
SCORE = {1: 0.9, 2: 0.8, 3: 0.6, 4: 0.4, 5: 0.2}
PROBLEMS = [(f"b{b}-{i}", b) for b in SCORE for i in range(6)]


def sweep_records():
    bon, beam2, beam4 = [], [], []
    for pid, b in PROBLEMS:
        s = SCORE[b]
        if b <= 2:
            bon.append(record(pid, [("5", s)] * 4))
        elif b == 3:  # n=1 sees a wrong answer; from n=2 the right one outweighs it
            bon.append(record(pid, [("0", s - 0.05), ("5", s + 0.05), ("5", s), ("5", s)]))
        else:
            bon.append(record(pid, [("0", s)] * 4))
        beam2.append(record(pid, [("5" if b == 5 else "0", 0.5)] * 2, [0, 0], "beam_search"))
        beam4.append(record(pid, [("5" if b >= 4 else "0", 0.5)] * 4, [0] * 4, "beam_search"))
    return bon, beam2, beam4


def sweep_points(rule=names.M_ACC_WEIGHTED):
    bon, beam2, beam4 = sweep_records()
    points = []
    for settings, records, run_id in ((BON, bon, "bon4"), (BEAM, beam2, "beam2"), (BEAM, beam4, "beam4")):
        data = outcomes(grade(records, "last", workers=1)[0], max_n=len(records[0].completions))
        for i, n in enumerate(data["n"]):
            correct = dict(zip(data["problem_ids"], map(bool, data["rules"][rule][i])))
            points.append(Point(config_key(settings), {**settings, "n": n}, n, float(n), correct, run_id))
    return points


def test_difficulty_from_a_best_of_n_run_bins_problems_by_pass1_and_prm_score():
    bon, _, _ = sweep_records()
    found = {d.problem_id: d for d in measure(grade(bon, "last", workers=1)[0])}
    assert found["b1-0"].pass1 == 1.0 and found["b3-0"].pass1 == 0.75 and found["b5-0"].pass1 == 0.0
    assert found["b3-0"].prm_mean == pytest.approx(0.6) and found["b3-0"].samples == 4
    model_bins, cuts = assign(list(found.values()), "model")
    assert model_bins == {pid: b for pid, b in PROBLEMS} and cuts == [0.9, 0.8, 0.6, 0.4]
    # pass@1 ties (1.0 on bins 1-2, 0.0 on bins 4-5): equal scores share a bin, so some bins are empty
    oracle_bins, _ = assign(list(found.values()), "oracle")
    assert {oracle_bins[f"b{b}-0"] for b in (1, 2)} == {1} and oracle_bins["b3-0"] == 3
    assert oracle_bins["b4-0"] == oracle_bins["b5-0"] == 4


def test_bins_are_quantile_thresholds_easiest_first():
    cuts = edges([0.1 * k for k in range(10)], 5)
    assert [bin_of(0.1 * k, cuts) for k in range(10)] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    assert bin_of(2.0, cuts) == 1 and bin_of(-1.0, cuts) == 5  # a new problem outside the range
    with pytest.raises(ValueError, match="bins=0"):
        edges([0.5], 0)


def test_folds_are_halves_of_every_bin_and_deterministic():
    bins = {pid: b for pid, b in PROBLEMS}
    fold = folds(bins)
    assert fold == folds(dict(reversed(list(bins.items()))))
    for b in SCORE:
        members = [fold[pid] for pid, bb in PROBLEMS if bb == b]
        assert sorted(members) == [0, 0, 0, 1, 1, 1]


def test_the_known_optimum_gives_exactly_its_table_and_a_curve_above_every_fixed_strategy():
    points = sweep_points()
    assert sorted((p.strategy, p.n) for p in points) == [("beam_search", 2), ("beam_search", 4), ("best_of_n", 1),
                                                        ("best_of_n", 2), ("best_of_n", 4)]
    results = route_budgets(points, {pid: b for pid, b in PROBLEMS}, 5)
    table = {r.budget: {b: (c.point.strategy, c.point.n) for b, c in r.routes.items()} for r in results}
    assert table == {
        1.0: {b: ("best_of_n", 1) for b in SCORE},  # nothing else is affordable
        # bins 1-2: n=1 already right (ties go to the cheaper); bin 4: nothing is right, the cheapest
        2.0: {1: ("best_of_n", 1), 2: ("best_of_n", 1), 3: ("best_of_n", 2), 4: ("best_of_n", 1), 5: ("beam_search", 2)},
        4.0: {1: ("best_of_n", 1), 2: ("best_of_n", 1), 3: ("best_of_n", 2), 4: ("beam_search", 4), 5: ("beam_search", 2)},
    }
    assert [r.accuracy for r in results] == [0.4, 0.8, 1.0]  # cross-validated: each bin's pattern holds on both halves
    assert [r.in_sample for r in results] == [0.4, 0.8, 1.0]
    bon, beam = config_key(BON), config_key(BEAM)
    assert [r.fixed[bon] for r in results] == [0.4, 0.6, 0.6]
    assert [r.fixed[beam] for r in results] == [None, 0.2, 0.4]
    for r in results:
        assert all(r.accuracy >= v for v in r.fixed.values() if v is not None)
    assert labels({bon: BON, beam: BEAM}) == {bon: "best_of_n", beam: "beam_search m=2"}


def test_without_cross_validation_the_selection_is_biased_upwards():
    """Ten configurations that are all right on half the problems at random: chosen and scored on
    the same problems, the best per bin looks far better than 0.5; cross-validated, it does not."""
    rng = random.Random(0)
    bins = {f"p{i}": 1 + i % 5 for i in range(200)}
    points = [Point(f"config-{c}", {"approach": "best_of_n", "n": n, "temperature": c}, n, float(n),
                    {p: rng.random() < 0.5 for p in bins}) for c in range(10) for n in (1, 2, 4)]
    biased = route_budgets(points, bins, 5, cross_validate=False)
    fair = route_budgets(points, bins, 5, cross_validate=True)
    for b, f in zip(biased, fair):
        best_fixed = max(v for v in b.fixed.values() if v is not None)
        assert b.accuracy == b.in_sample == f.in_sample
        assert b.accuracy > best_fixed + 0.03 and b.accuracy > 0.58  # the maximum of noisy bin means
        assert abs(f.accuracy - 0.5) < 0.06 and b.accuracy - f.accuracy > 0.06
    with pytest.raises(ValueError, match="at least 2 problems"):
        route_budgets(points[:1], {"p0": 1}, 5)


def test_points_must_cover_one_problem_set():
    points = sweep_points()
    points[0].correct.pop("b1-0")
    with pytest.raises(ValueError, match="no outcome for 1 of the 30 problems"):
        route_budgets(points, {pid: b for pid, b in PROBLEMS}, 5)


def test_budget_share_keeps_whole_groups():
    bon = record("a", [("5", 0.5)] * 4)
    dvts = record("a", [("5", 0.5)] * 4, [0, 0, 1, 1], "dvts")
    beam = record("a", [("5", 0.5)] * 4, [0] * 4, "beam_search")
    assert [budget_share([bon], n) for n in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert [budget_share([dvts], n) for n in (2, 4)] == [0.5, 1.0]
    assert [budget_share([beam], n) for n in (2, 4)] == [0.0, 1.0]
    assert budget_share([bon, dvts], 2) == 0.5


def test_the_deployable_table_routes_by_bin_within_what_is_left():
    points = sweep_points()
    bins = {pid: b for pid, b in PROBLEMS}
    results = route_budgets(points, bins, 5)
    config_labels = labels({p.config: {k: v for k, v in p.settings.items() if k != "n"} for p in points})
    table = deployable_table(results, config_labels, axis="n", rule=names.M_ACC_WEIGHTED, kind="model", nbins=5,
                             thresholds=[0.9, 0.8, 0.6, 0.4], probe={**BON, "max_tokens": 8}, probe_cost=1.0,
                             about={"run_id": "r"})
    check_table(json.loads(json.dumps(table)), "t.json")
    assert route_for(table, 4, 4, 4)[1]["settings"] == {**BEAM, "n": 4}
    assert route_for(table, 4, 3, 4)[0] == 2.0  # 3 left: the budget-2 row
    assert route_for(table, 5, 4, 1) == (1.0, table["budgets"][0]["routes"]["5"])  # n caps the route at 1
    assert route_for(table, 1, 0.5, 4) is None
    with pytest.raises(ValueError, match="oracle"):
        check_table({**table, "difficulty": {**table["difficulty"], "kind": "oracle"}}, "t.json")
    with pytest.raises(ValueError, match="no route for bins"):
        check_table({**table, "budgets": [{"budget": 1, "routes": {}}]}, "t.json")


# --- the pipeline: evaluate's FLOPs, `ttc optimal` over evaluated parents

PROBS = builtin_problems()[:6]


def script():
    """Per problem two-step solutions; the PRM's last-step score rises with the problem's index, and
    the right answer wins on the first three problems."""
    out = {}
    for k, p in enumerate(PROBS):
        s = 0.3 + 0.1 * k
        right, wrong = f"So \\boxed{{{p.answer}}}[s={s:.2f}]", f"So \\boxed{{0}}[s={s - 0.05:.2f}]"
        out[p.problem] = [f"Work.[s=0.5]\n\n{right}", f"Work.[s=0.5]\n\n{wrong}", f"Other.[s=0.4]\n\n{right if k < 3 else wrong}"]
    return out


def run_parent(**kw):
    from ttc_mlops.pipeline.run_chunk import run_chunk

    r = Recipe(**{"model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL, "dataset_name": BUILTIN_DATASET,
                  "num_samples": len(PROBS), "experiment_name": "opt", "max_tokens": 32, **kw})
    result = run_chunk(r, FakePolicy(script()), FakePRM(), progress=False)
    return r, result


def finish(r, result, flops=None):
    from ttc_mlops.pipeline import store
    from ttc_mlops.pipeline.evaluate import evaluate_parent
    from ttc_mlops.pipeline.merge import log_merge, merge

    if flops is not None:  # what the chunk's accounting logs on a real model
        store.log_metrics(result.run_id, {names.M_FLOPS: flops})
    log_merge(merge(result.parent_run_id, r))
    return evaluate_parent(result.parent_run_id, r, workers=1)


@pytest.mark.slow
def test_evaluate_logs_flops_per_problem_at_every_n(mlflow_store):
    from ttc_mlops.pipeline import store

    r, res = run_parent(n=4)
    finish(r, res, flops=6 * 4e9)  # 6 problems x 4 samples x 1e9
    assert store.metric_steps(res.parent_run_id, names.M_FLOPS_PER_PROBLEM) == {1: 1e9, 2: 2e9, 4: 4e9}
    r, res = run_parent(approach="beam_search", n=4, beam_width=2, num_iterations=3)
    finish(r, res, flops=6e9)
    steps = store.metric_steps(res.parent_run_id, names.M_FLOPS_PER_PROBLEM)
    assert steps and all(v == 1e9 for v in steps.values())  # one group: never subsampled


@pytest.mark.slow
def test_ttc_optimal_logs_curve_table_and_difficulty_then_compute_optimal_applies_it(mlflow_store, tmp_path,
                                                                                     monkeypatch):
    from ttc_mlops.pipeline import store
    from ttc_mlops.pipeline.run_chunk import run_chunk
    from ttc_mlops.search.compute_optimal import route_of

    monkeypatch.setenv("TTC_CACHE", str(tmp_path / "cache"))
    sweep = {}
    for kw in ({"n": 4}, {"approach": "dvts", "n": 4, "beam_width": 2, "num_iterations": 3},
               {"approach": "beam_search", "n": 4, "beam_width": 2, "num_iterations": 3}):
        r, res = run_parent(**kw)
        finish(r, res, flops=6 * 4e9)
        sweep[r.approach] = res.parent_run_id
    cli = CliRunner()
    out = cli.invoke(app, ["optimal", "--experiment", "opt", "--output", str(tmp_path / "co.png")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "co.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compute-optimal (2-fold CV)" in out.output and "best_of_n" in out.output and "dvts m=2" in out.output

    c = store.client()
    [run] = c.search_runs([c.get_experiment_by_name("opt").experiment_id],
                          filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_OPTIMAL}'")
    rid = run.info.run_id
    assert {a.path for a in c.list_artifacts(rid, "optimal")} == {names.OPTIMAL_TABLE, names.OPTIMAL_CURVE, names.OPTIMAL_PLOT,
                                                                  names.OPTIMAL_ROUTES}
    assert sorted(store.metric_steps(rid, names.M_ACC_WEIGHTED)) == [1, 2, 4]  # beside the parents in the UI's chart
    table = json.loads(store.load_run_text(rid, names.OPTIMAL_TABLE))
    assert table["difficulty"]["kind"] == "model" and table["difficulty"]["probe"]["approach"] == "best_of_n"
    assert [row["budget"] for row in table["budgets"]] == [1.0, 2.0, 4.0]
    difficulty = json.loads(store.load_run_text(sweep["best_of_n"], names.EVAL_DIFFICULTY))
    assert len(difficulty["problems"]) == 6 and difficulty["source_run"] == sweep["best_of_n"]
    pm = {d["problem_id"]: d["prm_mean"] for d in difficulty["problems"]}
    assert pm[PROBS[5].problem_id] > pm[PROBS[0].problem_id]  # the PRM scores rise with the index
    for pid in sweep.values():
        assert json.loads(store.load_run_text(pid, names.EVAL_OUTCOMES))["problem_ids"]
    # the FLOPs axis, from evaluate's flops_per_problem
    out = cli.invoke(app, ["optimal", "--experiment", "opt", "--budget", "flops", "--output", str(tmp_path / "f.png")])
    assert out.exit_code == 0, out.output

    # deploy: the compute_optimal strategy with the table by run id, merged, evaluated, registered
    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET,
               num_samples=len(PROBS), experiment_name="opt", approach="compute_optimal", optimal_table=rid,
               n=4, probe_n=2)
    res = run_chunk(r, FakePolicy(script()), FakePRM(), progress=False)
    done = finish(r, res)
    assert done.registered == ("ttc-SmolLM2-135M-Instruct-compute_optimal", "1")
    assert sorted(store.metric_steps(res.parent_run_id, names.M_ACC_WEIGHTED))[-1] <= 4
    for rec in res.records:
        route = route_of(rec)
        assert route["table"] == rid and 1 <= route["bin"] <= 5 and route["table_budget"] == 2.0
        assert len(rec.completions) == route["probe_completions"][1] <= 4
    # the table travels by run id: fetched again where the local copy is missing
    (tmp_path / "cache" / "optimal" / f"{rid}.json").unlink()
    out = cli.invoke(app, ["fetch-table", rid])
    assert out.exit_code == 0 and (tmp_path / "cache" / "optimal" / f"{rid}.json").is_file()


@pytest.mark.slow
def test_ttc_optimal_names_what_is_missing(mlflow_store, tmp_path):
    cli = CliRunner()
    out = cli.invoke(app, ["optimal", "--experiment", "nope"])
    assert out.exit_code == 1 and "experiment='nope' does not exist" in out.output
    r, res = run_parent(approach="dvts", n=4, beam_width=2, num_iterations=3)
    finish(r, res)
    out = cli.invoke(app, ["optimal", "--experiment", "opt", "--output", str(tmp_path / "x.png")])
    assert out.exit_code == 1 and "no evaluated best_of_n parent" in out.output
    r, res = run_parent(n=4, num_samples=3)
    finish(r, res)
    out = cli.invoke(app, ["optimal", "--experiment", "opt", "--output", str(tmp_path / "x.png")])
    assert out.exit_code == 1 and "2 different problem sets" in out.output
    out = cli.invoke(app, ["optimal", "--experiment", "opt", "--budget", "tokens"])
    assert out.exit_code == 1 and "budget='tokens'" in out.output
    out = cli.invoke(app, ["fetch-table", "f" * 32])
    assert out.exit_code == 1 and "neither a file nor a run" in out.output
