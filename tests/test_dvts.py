"""DVTS with scripted steps: each subtree follows its best step, subtrees stay independent."""

import pytest
from fakes import FakePolicy, FakePRM, StepPolicy

from ttc_mlops.config import Recipe, RecipeError, build_recipe
from ttc_mlops.data import Problem
from ttc_mlops.strategies import STRATEGIES

dvts = STRATEGIES["dvts"]

# n=4, beam_width=2: 2 subtrees; at the root subtree 0 gets options 0-1, subtree 1 options 2-3.
STEPS = {"P": {
    "": ["A[s=0.4]\n\n", "B[s=0.7]\n\n", "C[s=0.9]\n\n", "D \\boxed{1}[s=0.5]"],
    "B[s=0.7]\n\n": ["B1[s=0.3]\n\n", "B2 \\boxed{2}[s=0.8]"],
    "C[s=0.9]\n\n": ["C1[s=0.6]\n\n", "C2[s=0.65]\n\n"],
    "C[s=0.9]\n\nC2[s=0.65]\n\n": ["C2x \\boxed{3}[s=0.2]", "C2y \\boxed{4}[s=0.75]"],
}}


def recipe(**kw):
    return Recipe(**{"approach": "dvts", "n": 4, "beam_width": 2, "num_iterations": 3, "seed": 5, **kw})


def chosen(record, subtree):
    return [n.step for n in record.tree if n.subtree == subtree and n.status == "chosen"]


class RowsPRM(FakePRM):
    def __init__(self):
        super().__init__()
        self.rows = []

    def score(self, problems, completions):
        self.rows += completions
        return super().score(problems, completions)


def test_each_subtree_follows_its_best_step_and_keeps_its_last_candidates():
    policy = StepPolicy(STEPS)
    [r] = dvts([Problem("p", "P", "2")], policy, FakePRM(), recipe())
    assert [len(c) for c in policy.calls] == [4, 4, 2]  # subtree 0 stopped at its boxed answer
    assert chosen(r, 0) == ["B[s=0.7]\n\n", "B2 \\boxed{2}[s=0.8]"]
    assert chosen(r, 1) == ["C[s=0.9]\n\n", "C2[s=0.65]\n\n", "C2y \\boxed{4}[s=0.75]"]
    assert r.completions == ["B[s=0.7]\n\nB1[s=0.3]\n\n", "B[s=0.7]\n\nB2 \\boxed{2}[s=0.8]",
                             "C[s=0.9]\n\nC2[s=0.65]\n\nC2x \\boxed{3}[s=0.2]",
                             "C[s=0.9]\n\nC2[s=0.65]\n\nC2y \\boxed{4}[s=0.75]"]
    assert r.groups == [0, 0, 1, 1]
    assert r.finish_reasons == ["stop", "eos", "eos", "eos"]
    assert r.step_scores[3] == [0.9, 0.65, 0.75]
    assert r.completion_tokens == [2, 3, 4, 4]  # the subtree's chosen steps plus the candidate
    assert r.selected == 1 and r.pred == "2"
    assert "steps per subtree [2, 3]" in r.notes[0]
    # B1 stopped at a step beside its subtree's boxed answer: kept, as the reference does, but marked
    assert r.finished == [False, True, True, True]
    assert "1 of 4 completions unfinished" in r.notes[1]


def test_an_unfinished_candidate_is_never_selected_and_never_votes():
    from ttc_mlops.grading import extract_answer, is_equiv
    from ttc_mlops.voting import evaluate_records

    # one subtree: its boxed step ends it; the other candidate stopped mid-way but states the gold 7
    unfinished = "So the final answer is 7. [s=0.8]\n\n"
    steps = {"P": {"": ["A \\boxed{2}[s=0.9]", unfinished]}}
    [r] = dvts([Problem("p", "P", "7")], StepPolicy(steps), FakePRM(), recipe(n=2, num_iterations=3))
    assert r.completions == ["A \\boxed{2}[s=0.9]", unfinished] and r.finished == [True, False]
    assert r.selected == 0 and r.pred == "2"
    assert is_equiv(extract_answer(unfinished), "7")  # graded as an answer, it would be right
    ev = evaluate_records([r], "last", workers=1)
    assert ev.at(2) == {"acc_naive": 0.0, "acc_weighted": 0.0, "acc_maj": 0.0, "pass": 0.0}


def test_tree_links_candidates_to_the_chosen_step_of_their_subtree():
    [r] = dvts([Problem("p", "P", "2")], StepPolicy(STEPS), FakePRM(), recipe())
    assert len(r.tree) == 10
    for node in r.tree:
        if node.parent is not None:
            parent = r.tree[node.parent]
            assert parent.status == "chosen" and parent.subtree == node.subtree
    for node in r.tree:
        if node.completion is not None:
            text, cur = "", node
            while cur is not None:
                text = cur.step + text
                cur = r.tree[cur.parent] if cur.parent is not None else None
            assert text == r.completions[node.completion]


def test_subtrees_are_scored_apart_and_do_not_depend_on_each_other():
    prm = RowsPRM()
    dvts([Problem("p", "P", "2")], StepPolicy(STEPS), prm, recipe())
    assert prm.rows == [  # one row per subtree and iteration: its own candidates only
        ["A[s=0.4]\n\n", "B[s=0.7]\n\n"], ["C[s=0.9]\n\n", "D \\boxed{1}[s=0.5]"],
        ["B[s=0.7]\n\nB1[s=0.3]\n\n", "B[s=0.7]\n\nB2 \\boxed{2}[s=0.8]"],
        ["C[s=0.9]\n\nC1[s=0.6]\n\n", "C[s=0.9]\n\nC2[s=0.65]\n\n"],
        ["C[s=0.9]\n\nC2[s=0.65]\n\nC2x \\boxed{3}[s=0.2]", "C[s=0.9]\n\nC2[s=0.65]\n\nC2y \\boxed{4}[s=0.75]"]]
    # seeded per subtree: adding subtrees (a larger n) leaves the first ones as they were
    [small] = dvts(PROBLEMS[:1], FakePolicy(SCRIPT), FakePRM(), recipe(n=4))
    [large] = dvts(PROBLEMS[:1], FakePolicy(SCRIPT), FakePRM(), recipe(n=8))
    assert large.completions[:4] == small.completions and large.groups == [0, 0, 1, 1, 2, 2, 3, 3]


def test_lookahead_picks_by_the_rollout_and_keeps_only_the_step():
    steps = {"L": {
        "": ["A[s=0.3]\n\n", "B[s=0.6]\n\n"],
        "A[s=0.3]\n\n": ["A1[s=0.9]\n\n"],
        "B[s=0.6]\n\n": ["B1[s=0.2]\n\n"],
        "A[s=0.3]\n\nA1[s=0.9]\n\n": ["A end \\boxed{1}[s=0.8]"],
        "B[s=0.6]\n\nB1[s=0.2]\n\n": ["B end \\boxed{2}[s=0.5]"],
    }}
    problem = [Problem("l", "L", "1")]
    [plain] = dvts(problem, StepPolicy(steps), FakePRM(), recipe(n=2, num_iterations=2))
    assert chosen(plain, 0)[0] == "B[s=0.6]\n\n"
    [ahead] = dvts(problem, StepPolicy(steps), FakePRM(), recipe(n=2, num_iterations=2, lookahead=1))
    assert chosen(ahead, 0)[0] == "A[s=0.3]\n\n"
    assert ahead.completions[0] == "A[s=0.3]\n\nA1[s=0.9]\n\nA end \\boxed{1}[s=0.8]"
    assert ahead.step_scores[0] == [0.3, 0.9, 0.8]
    first = ahead.tree[0]  # scored with its lookahead (0.9), but its own score is its own (0.3)
    assert first.lookahead == "A1[s=0.9]\n\n" and first.agg == 0.9 and first.step_score == 0.3


SCRIPT = {
    "1+1?": ["Add.[s=0.9]\n\nOne and one.[s=0.6]\n\nSo \\boxed{2}[s=0.8]", "Guess.[s=0.7]\n\nSo \\boxed{3}[s=0.2]",
             "Hmm.[s=0.1]\n\nThink.[s=0.5]\n\nSo \\boxed{2}[s=0.95]", "Add.[s=0.9]\n\nSo \\boxed{2}[s=0.85]"],
    "2+2?": ["Two twos.[s=0.7]\n\nSo \\boxed{4}[s=0.7]", "So \\boxed{5}[s=0.3]",
             "Count.[s=0.4]\n\nFour.[s=0.8]\n\nSo \\boxed{4}[s=0.9]"],
}
PROBLEMS = [Problem("a", "1+1?", "2"), Problem("b", "2+2?", "4")]


def test_batching_across_problems_gives_the_same_results_as_one_at_a_time():
    r = recipe(n=8, num_iterations=3)
    policy = FakePolicy(SCRIPT)
    together = dvts(PROBLEMS, policy, FakePRM(), r)
    assert len(policy.calls) <= 3 and len(policy.calls[0]) == 16  # all subtrees of both problems at once
    alone = [rec for p in reversed(PROBLEMS) for rec in dvts([p], FakePolicy(SCRIPT), FakePRM(), r)]
    by_id = {rec.problem_id: rec for rec in alone}
    for rec in together:
        other = by_id[rec.problem_id]
        assert (rec.completions, rec.step_scores, rec.tree) == (other.completions, other.step_scores, other.tree)
        assert len(rec.completions) == 8


@pytest.mark.parametrize("bad, words", [
    ({"n": 6, "beam_width": 4}, ["n=6", "beam_width=4"]),
    ({"n": 2, "beam_width": 4}, ["beam_width=4", "n=2"]),
    ({"num_iterations": 0}, ["num_iterations=0"]),
    ({"lookahead": -2}, ["lookahead=-2"]),
])
def test_bad_input_names_the_values(bad, words):
    with pytest.raises(RecipeError) as err:
        build_recipe({"approach": "dvts", **bad})
    assert all(w in str(err.value) for w in words)
