"""Evaluate on hand-made records whose right answers are known, and on a real MLflow store."""

import pytest
from fakes import FakePolicy, FakePRM

from ttc_mlops import names
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.grading import plain_number
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.evaluate import evaluate_parent
from ttc_mlops.pipeline.merge import log_merge, merge
from ttc_mlops.pipeline.run_chunk import run_chunk
from ttc_mlops.records import Record
from ttc_mlops.voting import EvaluateError, budgets, classify, evaluate_records


def record(pid, gold, answers, scores, level=None, groups=None, agg="last"):
    completions = [f"Step.\n\nSo \\boxed{{{a}}}" if a is not None else "I give up." for a in answers]
    return Record(problem_id=pid, problem=pid, answer=gold, level=level, subject=None, completions=completions,
                  step_scores=[[0.5, s] for s in scores], agg_scores=list(scores),
                  completion_tokens=[10] * len(answers), finish_reasons=["eos"] * len(answers), selected=None,
                  pred=None, approach="best_of_n", agg_strategy=agg, groups=groups or list(range(len(answers))))


# p1 (level 1, gold 1/2): correct in three notations, but the best-scored answer is wrong
P1 = record("p1", "\\frac{1}{2}", ["0.5", "3", "1/2", "\\frac12"], [0.2, 0.9, 0.3, 0.6], level=1)
# p2 (level 2, gold 5): "4" and "4.0" pool their votes; the highest score has no answer at all
P2 = record("p2", "5", ["4", None, "4.0", "5"], [0.8, 0.95, 0.5, 0.1], level=2)


def test_voting_rules_at_every_n_on_known_records():
    ev = evaluate_records([P1, P2], "last", workers=1)
    m = ev.metrics
    assert sorted(m) == [1, 2, 4]
    assert ev.at(1) == {"acc_naive": 0.5, "acc_weighted": 0.5, "acc_maj": 0.5, "pass": 0.5}
    # n=2: p1 has 0.5 (right) vs 3 (wrong, higher score); a 1-1 vote goes to the first answer seen
    assert ev.at(2) == {"acc_naive": 0.0, "acc_weighted": 0.0, "acc_maj": 0.5, "pass": 0.5}
    # n=4: p1's right answers weigh 1.1 against 0.9 and outnumber 3 to 1; p2's "4"s win both votes
    assert ev.at(4) == {"acc_naive": 0.0, "acc_weighted": 0.5, "acc_maj": 0.5, "pass": 1.0}
    assert m[4]["acc_weighted_level_1"] == 1.0 and m[4]["acc_weighted_level_2"] == 0.0
    assert m[1]["acc_naive_level_1"] == 1.0 and m[4]["eval_problems"] == 2
    assert {"n": 4, "level": "2", "problems": 1, "acc_naive": 0.0, "acc_weighted": 0.0, "acc_maj": 0.0,
            "pass": 1.0} in ev.rows
    assert not any("@" in k for step in m.values() for k in step)
    assert evaluate_records([P1, P2], "last", workers=1).metrics == m  # same records, same numbers


def test_groups_are_never_cut():
    # DVTS with beam_width 2: two subtrees of two leaves; n=1 would cut a subtree
    r = record("g", "7", ["7", "1", "1", "1"], [0.1, 0.2, 0.9, 0.9], groups=[0, 0, 1, 1])
    ev = evaluate_records([r], "last", workers=1)
    assert sorted(ev.metrics) == [2, 4]
    assert ev.at(2)["pass"] == 1.0 and ev.at(2)["acc_naive"] == 0.0


def test_voting_follows_the_recipes_agg_strategy():
    r = record("a", "2", ["2", "9"], [0.9, 0.8])
    r.step_scores = [[0.1, 0.9], [0.7, 0.8]]  # by `min`, the wrong answer wins
    assert evaluate_records([r], "last", workers=1).at(2)["acc_naive"] == 1.0
    assert evaluate_records([r], "min", workers=1).at(2)["acc_naive"] == 0.0


def test_equivalence_and_classes():
    assert plain_number("\\frac{3}{4}") == plain_number("0.75") == plain_number("3/4") == plain_number("\\dfrac34")
    assert plain_number("-\\frac{1}{2}") == plain_number("-0.5") and plain_number("x+1") is None
    assert plain_number("\\frac{1}{0}") is None
    classes, correct = classify("\\sqrt{2}", ["2^{1/2}", "\\sqrt2", "1.4", "7/5", "\\frac{7}{5}", "junk"])
    assert classes == [0, 0, 1, 1, 1, 2] and correct == [True, False, False]
    assert budgets(8) == [1, 2, 4, 8] and budgets(6) == [1, 2, 4, 6]


def test_the_process_pool_grades_the_same(monkeypatch):
    import ttc_mlops.voting as voting

    monkeypatch.setattr(voting, "POOL_MIN_ANSWERS", 0)
    assert evaluate_records([P1, P2], "last", workers=2).metrics == evaluate_records([P1, P2], "last", workers=1).metrics


PROBLEMS = builtin_problems()[:4]
SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.9]", "So \\boxed{0}[s=0.2]"] for p in PROBLEMS}


def recipe(**kw):
    return Recipe(**{"model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL, "dataset_name": BUILTIN_DATASET,
                     "num_samples": 4, "n": 4, "experiment_name": "e", **kw})


@pytest.mark.slow
def test_evaluate_logs_metrics_with_step_n_on_the_merged_parent(mlflow_store):
    r = recipe()
    pid = run_chunk(r, FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
    with pytest.raises(EvaluateError, match=f"parent run {pid} has no merged records .*ttc merge --parent-run-id {pid}"):
        evaluate_parent(pid, r, register=False)
    assert store.client().get_run(pid).data.metrics == {}  # nothing logged

    log_merge(merge(pid, r))
    first = evaluate_parent(pid, r, register=False)
    c = store.client()
    history = c.get_metric_history(pid, "acc_naive")
    assert sorted(m.step for m in history) == [1, 2, 4]
    assert {m.step: m.value for m in history}[4] == 1.0  # with all four samples, the right one scores highest
    assert c.get_metric_history(pid, "acc_naive_level_1")
    tags = c.get_run(pid).data.tags
    assert tags[names.TAG_GROUP] == "SmolLM2-135M-Instruct/best_of_n"
    artifacts = {a.path for a in c.list_artifacts(pid, "eval")}
    assert {names.EVAL_TABLE, names.EVAL_PLOT} <= artifacts

    again = evaluate_parent(pid, r, register=False)
    assert again.already and again.evaluation.metrics == first.evaluation.metrics
    assert len(c.get_metric_history(pid, "acc_naive")) == 3  # not logged twice
