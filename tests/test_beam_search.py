"""Beam search with scripted steps: the exact beams kept, no padding, lookahead, batch independence."""

import pytest
from fakes import FakePolicy, FakePRM, StepPolicy

from ttc_mlops.config import Recipe, RecipeError, build_recipe
from ttc_mlops.data import Problem
from ttc_mlops.strategies import STRATEGIES

beam_search = STRATEGIES["beam_search"]

# n=4, beam_width=2: 4 candidates at the root, the best 2 live ones expanded twice each.
STEPS = {"P": {
    "": ["A[s=0.9]\n\n", "B[s=0.2]\n\n", "C[s=0.8]\n\n", "D so \\boxed{1}[s=0.3]\n\n"],
    "A[s=0.9]\n\n": ["A1[s=0.4]\n\n", "A2[s=0.7]\n\n"],
    "C[s=0.8]\n\n": ["C1[s=0.95]\n\n", "C2 \\boxed{2}[s=0.6]"],
    "C[s=0.8]\n\nC1[s=0.95]\n\n": ["C1x \\boxed{3}[s=0.5]", "C1y \\boxed{4}[s=0.85]"],
    "A[s=0.9]\n\nA2[s=0.7]\n\n": ["A2x \\boxed{5}[s=0.65]", "A2y \\boxed{6}[s=0.1]"],
}}


def recipe(**kw):
    return Recipe(**{"approach": "beam_search", "n": 4, "beam_width": 2, "num_iterations": 3, "seed": 5,
                     "sort_completed": True, **kw})


def kept(record, iteration):
    return [node.step for node in record.tree if node.iteration == iteration and node.status == "kept"]


def path_text(record, node_id):
    text = ""
    while node_id is not None:
        node = record.tree[node_id]
        text, node_id = node.step + text, node.parent
    return text


def test_exact_beams_kept_at_each_iteration():
    policy = StepPolicy(STEPS)
    [r] = beam_search([Problem("p", "P", "4")], policy, FakePRM(), recipe())
    assert [len(c) for c in policy.calls] == [4, 4, 4]
    assert kept(r, 0) == ["A[s=0.9]\n\n", "C[s=0.8]\n\n"]  # B (0.2) pruned, D finished with a boxed answer
    assert kept(r, 1) == ["A2[s=0.7]\n\n", "C1[s=0.95]\n\n"]  # A1 (0.4) pruned, C2 finished
    assert [n.status for n in r.tree if n.iteration == 0] == ["kept", "pruned", "kept", "finished"]
    # 6 beams finished (D, C2, and 4 in the last iteration); sort_completed keeps the best 4
    assert r.completions == ["C[s=0.8]\n\nC1[s=0.95]\n\nC1y \\boxed{4}[s=0.85]",
                             "A[s=0.9]\n\nA2[s=0.7]\n\nA2x \\boxed{5}[s=0.65]",
                             "C[s=0.8]\n\nC2 \\boxed{2}[s=0.6]",
                             "C[s=0.8]\n\nC1[s=0.95]\n\nC1x \\boxed{3}[s=0.5]"]
    assert r.step_scores[0] == [0.8, 0.95, 0.85] and r.agg_scores == [0.85, 0.65, 0.6, 0.5]
    assert r.selected == 0 and r.pred == "4"
    assert r.completion_tokens == [4, 4, 3, 4]  # words of every step on the path
    assert r.finish_reasons == ["eos"] * 4
    assert any("6 beams finished" in note for note in r.notes)


def test_without_sort_completed_the_first_to_finish_are_kept():
    [r] = beam_search([Problem("p", "P", "4")], StepPolicy(STEPS), FakePRM(), recipe(sort_completed=False))
    assert [c.rstrip().split("\n\n")[-1] for c in r.completions] == [
        "D so \\boxed{1}[s=0.3]", "C2 \\boxed{2}[s=0.6]", "C1y \\boxed{4}[s=0.85]", "A2x \\boxed{5}[s=0.65]"]
    assert r.finish_reasons[0] == "stop"  # stopped at the delimiter, finished by its boxed answer


def test_tree_rebuilds_every_completion_from_parent_links():
    [r] = beam_search([Problem("p", "P", "4")], StepPolicy(STEPS), FakePRM(), recipe())
    assert len(r.tree) == 12  # 4 candidates in each of 3 iterations
    leaves = {node.completion: node.id for node in r.tree if node.completion is not None}
    assert sorted(leaves) == [0, 1, 2, 3]
    for i, text in enumerate(r.completions):
        assert path_text(r, leaves[i]) == text
    for node in r.tree:
        if node.parent is not None:
            assert r.tree[node.parent].status == "kept"
            assert r.tree[node.parent].iteration == node.iteration - 1


def test_no_padding_duplicates_dropped_and_the_record_says_so():
    steps = {"Q": {
        "": ["A[s=0.9]\n\n", "A[s=0.9]\n\n", "B[s=0.5]\n\n", "C \\boxed{1}[s=0.4]"],
        "A[s=0.9]\n\n": ["A1 \\boxed{2}[s=0.7]"],
        "B[s=0.5]\n\n": ["B1 \\boxed{3}[s=0.6]"],
    }}
    policy = StepPolicy(steps)
    [r] = beam_search([Problem("q", "Q", "2")], policy, FakePRM(),
                      recipe(beam_width=1, num_iterations=2, filter_duplicates=True))
    assert [len(c) for c in policy.calls] == [4, 2]  # 2 live beams: 2 candidates, not 4 copies
    assert [n.status for n in r.tree if n.iteration == 0] == ["kept", "duplicate", "kept", "finished"]
    assert len(r.completions) == 3 and len(set(r.completions)) == 3
    assert any("3 of n=4 beams finished (no padding)" in note for note in r.notes)
    assert any("2 of n/beam_width=4 beams live" in note for note in r.notes)


def test_lookahead_scores_greedy_rollouts_but_keeps_only_the_step():
    steps = {"L": {
        "": ["A[s=0.3]\n\n", "B[s=0.6]\n\n"],
        "A[s=0.3]\n\n": ["A1[s=0.9]\n\n"],
        "B[s=0.6]\n\n": ["B1[s=0.2]\n\n"],
        "A[s=0.3]\n\nA1[s=0.9]\n\n": ["A end \\boxed{1}[s=0.8]"],
        "B[s=0.6]\n\nB1[s=0.2]\n\n": ["B end \\boxed{2}[s=0.5]"],
    }}
    problem = [Problem("l", "L", "1")]
    [plain] = beam_search(problem, StepPolicy(steps), FakePRM(), recipe(n=2, beam_width=2, num_iterations=2))
    assert kept(plain, 0) == ["B[s=0.6]\n\n"]
    policy = StepPolicy(steps)
    [ahead] = beam_search(problem, policy, FakePRM(), recipe(n=2, beam_width=2, num_iterations=2, lookahead=1))
    assert kept(ahead, 0) == ["A[s=0.3]\n\n"]  # its greedy next step scores 0.9
    assert ahead.tree[0].lookahead == "A1[s=0.9]\n\n" and ahead.tree[0].agg == 0.9
    assert ahead.tree[0].step_score == 0.3  # the step's own score, not its lookahead's
    assert [len(c) for c in policy.calls] == [2, 2, 2]  # step, lookahead, last iteration (no lookahead)
    assert ahead.completions[0] == "A[s=0.3]\n\nA1[s=0.9]\n\nA end \\boxed{1}[s=0.8]"
    assert ahead.step_scores[0] == [0.3, 0.9, 0.8]


SCRIPT = {
    "1+1?": ["Add.[s=0.9]\n\nOne and one.[s=0.6]\n\nSo \\boxed{2}[s=0.8]", "Guess.[s=0.7]\n\nSo \\boxed{3}[s=0.2]",
             "Hmm.[s=0.1]\n\nThink.[s=0.5]\n\nSo \\boxed{2}[s=0.95]", "Add.[s=0.9]\n\nSo \\boxed{2}[s=0.85]"],
    "2+2?": ["Two twos.[s=0.7]\n\nSo \\boxed{4}[s=0.7]", "So \\boxed{5}[s=0.3]",
             "Count.[s=0.4]\n\nFour.[s=0.8]\n\nSo \\boxed{4}[s=0.9]"],
    "3+3?": ["Six.[s=0.6]\n\nSo \\boxed{6}[s=0.9]", "Nine.[s=0.5]\n\nSo \\boxed{9}[s=0.4]"],
}
PROBLEMS = [Problem("a", "1+1?", "2"), Problem("b", "2+2?", "4"), Problem("c", "3+3?", "6")]


def test_batching_across_problems_gives_the_same_results_as_one_at_a_time():
    r = recipe(n=8, beam_width=2, num_iterations=3)
    policy = FakePolicy(SCRIPT)
    together = beam_search(PROBLEMS, policy, FakePRM(), r)
    assert len(policy.calls) == 3  # one generate call per iteration for all problems
    assert all({p.problem for p in PROBLEMS} <= {q.split("\nQ: ")[1].split("\nA: ")[0] for q in call}
               for call in policy.calls[:1])
    alone = [rec for p in reversed(PROBLEMS) for rec in beam_search([p], FakePolicy(SCRIPT), FakePRM(), r)]
    by_id = {rec.problem_id: rec for rec in alone}
    for rec in together:
        other = by_id[rec.problem_id]
        assert (rec.completions, rec.step_scores, rec.tree, rec.notes) == \
               (other.completions, other.step_scores, other.tree, other.notes)
        assert 0 < len(rec.completions) <= 8


@pytest.mark.parametrize("bad, words", [
    ({"beam_width": 8, "n": 4}, ["beam_width=8", "n=4"]),
    ({"num_iterations": 0}, ["num_iterations=0"]),
    ({"lookahead": -1}, ["lookahead=-1"]),
])
def test_bad_input_names_the_values(bad, words):
    with pytest.raises(RecipeError) as err:
        build_recipe({"approach": "beam_search", **bad})
    assert all(w in str(err.value) for w in words)


def test_prm_reuses_scores_within_a_search_and_forgets_finished_problems(tiny_llama_dir, monkeypatch):
    from ttc_mlops.prm import stepwise
    from ttc_mlops.prm.rlhflow import RLHFlowPRM

    prm = RLHFlowPRM(Recipe(prm_path=str(tiny_llama_dir), prm_family="rlhflow", dtype="float32", device="cpu").prm_settings)
    first = prm.score(["P"], [["Add.\n\nSo 2.", "Add.\n\nSo 3."]])
    spent = prm.tokens_processed
    again = prm.score(["P", "P"], [["Add.\n\nSo 2."], ["Add.\n\nSo 3.", "Add.\n\nSo 2."]])
    assert prm.tokens_processed == spent and again[1] == first[0][::-1]
    # a step's score depends on its prefix only: a partial solution scores as the longer one began
    [[prefix]] = prm.score(["P"], [["Add.\n\n"]])
    assert prefix == pytest.approx(first[0][0][:1], abs=1e-5)
    prm.score(["Q"], [["Other."]])  # another problem scored between two of P's iterations: P's scores stay
    spent = prm.tokens_processed
    prm.score(["P"], [["Add.\n\nSo 2."]])
    assert prm.tokens_processed == spent
    monkeypatch.setattr(stepwise, "RECENT_PROBLEMS", 1)  # only the last problem's scores are kept
    prm.score(["Q"], [["Other."]])
    spent = prm.tokens_processed
    prm.score(["P"], [["Add.\n\nSo 2."]])
    assert prm.tokens_processed > spent
