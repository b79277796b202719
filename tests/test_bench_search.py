"""benchmarks/bench_search.py's critical path: the longest chain of tokens a search must decode one after another."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_search import critical_tokens  # noqa: E402

from ttc_mlops.records import TreeNode  # noqa: E402


def node(it, tokens, subtree=None, sweep=None):
    return TreeNode(id=0, parent=None, iteration=it, step="x", lookahead="", tokens=tokens, finish="stop",
                    step_score=0.5, agg=0.5, status="kept", subtree=subtree, sweep=sweep)


def record(tree=(), tokens=()):
    return SimpleNamespace(tree=list(tree), completion_tokens=list(tokens))


def test_a_problem_waits_for_its_slowest_candidate_every_iteration():
    beams = record([node(0, 3), node(0, 7), node(0, 5), node(1, 2), node(1, 4)])
    assert critical_tokens([beams], lookahead=0) == 7 + 4


def test_dvts_subtrees_are_chains_of_their_own():
    tree = [node(0, 3, 0), node(0, 9, 0), node(1, 4, 0), node(1, 4, 0),  # subtree 0: 9 + 4
            node(0, 10, 1), node(0, 1, 1), node(1, 1, 1), node(1, 2, 1)]  # subtree 1: 10 + 2
    assert critical_tokens([record(tree)], lookahead=0) == 13


def test_particle_gibbs_sweeps_run_one_after_another():
    tree = [node(0, 2, sweep=0), node(0, 3, sweep=0), node(1, 6, sweep=0), node(0, 5, sweep=1), node(0, 1, sweep=1)]
    assert critical_tokens([record(tree)], lookahead=0) == 3 + 6 + 5


def test_best_of_n_waits_for_its_longest_completion_and_the_longest_problem_counts():
    assert critical_tokens([record(tokens=[10, 40, None]), record([node(0, 12), node(1, 30)])], lookahead=0) == 42


def test_lookahead_is_not_counted_so_no_figure_is_given():
    assert critical_tokens([record([node(0, 3)])], lookahead=1) is None


# --- benchmarks/sim_speculation.py: the schedule run_steps keeps, and the one that guesses

def subtree(first_chosen: bool):
    """One DVTS subtree: a 2-token and a 10-token candidate, then two 3-token ones."""
    status = ["chosen", "rejected"] if first_chosen else ["rejected", "chosen"]
    agg = [0.9, 0.1] if first_chosen else [0.1, 0.9]
    tree = [node(0, 2, 0), node(0, 10, 0), node(1, 3, 0), node(1, 3, 0)]
    for n, s, a in zip(tree, status, agg):
        n.status, n.agg = s, a
    return [record(tree)]


def simulate(records, speculate):
    from sim_speculation import groups_of, simulate

    return simulate(groups_of(records), speculate, step_ms=10.0, row_ms=1.0, prm_call_ms=0.0, prm_candidate_ms=0.0)


def test_the_plain_schedule_takes_the_critical_path_in_steps_and_the_generated_tokens_in_row_steps():
    plain = simulate(subtree(first_chosen=True), speculate=False)
    assert (plain["steps"], plain["row_steps"], plain["prm_calls"]) == (10 + 3, 2 + 10 + 3 + 3, 2)
    assert plain["steps"] == critical_tokens(subtree(first_chosen=True), lookahead=0)
    assert plain["s"] == (13 * 10.0 + 18 * 1.0) / 1000


def test_a_right_guess_starts_the_next_iteration_beside_the_slow_candidate():
    spec = simulate(subtree(first_chosen=True), speculate=True)
    assert (spec["steps"], spec["row_steps"], spec["right"], spec["wrong"]) == (10, 18, 1, 0)


def test_a_wrong_guess_is_aborted_and_costs_its_rows():
    spec = simulate(subtree(first_chosen=False), speculate=True)
    # the guess's two 3-token requests ran beside the slow candidate (steps 3-5) and gave nothing
    assert (spec["steps"], spec["row_steps"], spec["right"], spec["wrong"]) == (13, 18 + 6, 0, 1)
