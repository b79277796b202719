from fakes import FakePolicy, FakePRM

from ttc_mlops.config import Recipe
from ttc_mlops.data import Problem
from ttc_mlops.strategies import STRATEGIES

SCRIPT = {
    "1+1?": ["Add.[s=0.9]\n\nSo \\boxed{2}[s=0.8]", "Guess.[s=0.9]\n\nSo \\boxed{3}[s=0.2]",
             "Hmm.[s=0.1]\n\nSo \\boxed{2}[s=0.95]"],
    "2+2?": ["So \\boxed{4}[s=0.7]", "So \\boxed{5}[s=0.3]"],
}
PROBLEMS = [Problem("a", "1+1?", "2"), Problem("b", "2+2?", "4")]


def run(problems, agg="last", n=8):
    recipe = Recipe(n=n, agg_strategy=agg, seed=3)
    return STRATEGIES["best_of_n"](problems, FakePolicy(SCRIPT), FakePRM(), recipe)


def test_keeps_every_completion_step_score_and_token_count():
    records = run(PROBLEMS)
    for r in records:
        assert len(r.completions) == len(r.step_scores) == len(r.agg_scores) == len(r.completion_tokens) == 8
        assert all(t is not None and t > 0 for t in r.completion_tokens)
        assert r.finish_reasons == ["eos"] * 8
    first = records[0]
    for text, steps in zip(first.completions, first.step_scores):
        assert len(steps) == text.count("\n\n") + 1


def test_selection_follows_agg_strategy():
    by_last = run(PROBLEMS, "last")[0]
    assert by_last.completions[by_last.selected].startswith("Hmm.")  # last step 0.95
    by_min = run(PROBLEMS, "min")[0]
    assert by_min.completions[by_min.selected].startswith("Add.")  # min 0.8
    assert by_min.pred == "2"
    by_prod = run(PROBLEMS, "prod")[0]
    assert abs(by_prod.agg_scores[by_prod.selected] - 0.9 * 0.8) < 1e-9


def test_one_generate_call_for_all_problems():
    policy = FakePolicy(SCRIPT)
    STRATEGIES["best_of_n"](PROBLEMS, policy, FakePRM(), Recipe(n=4))
    assert len(policy.calls) == 1 and len(policy.calls[0]) == 8


def test_batching_does_not_change_results():
    together = run(PROBLEMS)
    alone = run(PROBLEMS[1:]) + run(PROBLEMS[:1])
    by_id = {r.problem_id: r for r in alone}
    for r in together:
        assert r.completions == by_id[r.problem_id].completions
