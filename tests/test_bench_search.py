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
