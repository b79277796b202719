"""Particle filtering / particle Gibbs on scripted steps with known scores: resampling follows the
weights, weight 0 is never drawn, references survive a Gibbs sweep, records ignore batch and resume."""

import pytest
from fakes import FakePolicy, FakePRM, StepPolicy, StreamingPolicy

from ttc_mlops import names
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe, RecipeError, build_recipe
from ttc_mlops.data import Problem, builtin_problems
from ttc_mlops.records import Record
from ttc_mlops.runner import metered, run_search
from ttc_mlops.search.particle_filtering import resample, resampling_weights
from ttc_mlops.strategies import STRATEGIES

pf = STRATEGIES["particle_filtering"]

# four first steps of known scores (StepPolicy gives the k-th request of a prompt option k), each
# followed by a boxed answer
FIRST = ["A[s=0.2]\n\n", "B[s=0.5]\n\n", "C[s=0.8]\n\n", "Z[s=0.0]\n\n"]
WORLD = {"P": {"": FIRST, **{f: [f"\\boxed{{{i}}}[s=0.6]"] for i, f in enumerate(FIRST)}}}


def recipe(**kw):
    return Recipe(**{"approach": "particle_filtering", "n": 4, "num_iterations": 3, "seed": 5, **kw})


def odds_weights(scores, temperature):
    """softmax(logit(s) / T) written as normalised odds^(1/T): the paper's weights, independently."""
    raw = [(s / (1 - s)) ** (1 / temperature) for s in scores]
    return [x / sum(raw) for x in raw]


def chi_square(counts, expected_p):
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, expected_p) if p > 0)


CHI2_999 = {2: 13.82, 3: 16.27}  # the chi-square distribution's 0.999 quantile by degrees of freedom


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_the_strategy_resamples_in_proportion_to_the_weights(temperature):
    counts = [0, 0, 0, 0]
    for seed in range(300):  # 300 problems' worth of draws, 4 each
        [r] = pf([Problem("p", "P", "1")], StepPolicy(WORLD), FakePRM(), recipe(seed=seed, pf_temperature=temperature))
        first = [n for n in r.tree if n.iteration == 0]
        assert [n.step for n in first] == FIRST
        for k, n in enumerate(first):
            counts[k] += n.copies
    assert sum(counts) == 4 * 300
    assert counts[3] == 0  # a step that scored 0 is never drawn
    expected = odds_weights([0.2, 0.5, 0.8], temperature) + [0.0]
    assert chi_square(counts, expected) < CHI2_999[2], (counts, expected)
    # and the weights the record shows are those
    assert [n.weight for n in first] == pytest.approx(expected)


def test_resampling_frequencies_over_many_seeds_match_the_weights():
    import random

    scores = [0.3, 0.6, 0.9, 0.75, 0.0]
    weights = resampling_weights(scores, 1.0)
    assert weights == pytest.approx(odds_weights(scores[:4], 1.0) + [0.0])
    counts = [0] * 5
    for seed in range(2000):
        for k in resample(weights, 5, random.Random(seed)):
            counts[k] += 1
    assert counts[4] == 0
    assert chi_square(counts, weights) < CHI2_999[3], (counts, weights)
    # a statistic that can fail: the same draws against uniform weights are far out
    assert chi_square(counts, [0.25, 0.25, 0.25, 0.25, 0.0]) > 10 * CHI2_999[3]


def test_weights_at_the_edges():
    assert resampling_weights([0.0, 0.0], 1.0) is None  # nothing to prefer: the caller draws uniformly
    assert resampling_weights([1.0, 0.7, 1.0], 1.0) == [0.5, 0.0, 0.5]  # certainty takes all the mass
    assert resampling_weights([0.5, 0.5], 0.1) == [0.5, 0.5]


def test_ancestry_is_the_tree_and_finished_particles_keep_their_slots():
    [r] = pf([Problem("p", "P", "2")], StepPolicy(WORLD), FakePRM(), recipe())
    nodes = {n.id: n for n in r.tree}
    assert len(r.completions) == 4 and r.groups == [0] * 4 and all(r.finished)
    for i, text in enumerate(r.completions):  # each completion is the path from its leaf to the root
        [leaf] = [n for n in r.tree if n.completion == i]
        path, node = [], leaf
        while node is not None:
            path.append(node.step)
            node = nodes.get(node.parent)
        assert "".join(reversed(path)) == text
        assert nodes[leaf.parent].copies >= 1  # it continues a particle that was drawn
    assert r.completion_tokens == [sum(len(s.split()) for s in c.split("\n\n") if s) for c in r.completions]
    assert r.pred == str(FIRST.index(r.completions[r.selected].split("\\boxed")[0]))


def test_particle_gibbs_keeps_its_references_and_counts_every_sweep():
    one, two = (recipe(n=4, num_iterations=4, pg_iterations=k, pg_reference_particles=2) for k in (1, 2))
    script = {"1+1?": ["Add.[s=0.9]\n\nOne and one.[s=0.6]\n\nSo \\boxed{2}[s=0.8]",
                       "Guess.[s=0.7]\n\nSo \\boxed{3}[s=0.2]", "Hmm.[s=0.1]\n\nSo \\boxed{2}[s=0.95]"]}
    problems = [Problem("a", "1+1?", "2")]
    usage = {}
    for r in (one, two):
        policy, prm = metered(FakePolicy(script), FakePRM())
        [record] = pf(problems, policy, prm, r)
        usage[r.pg_iterations] = (record, policy.usage)
    record, spent = usage[2]
    # the two references of sweep 0 are the last sweep's first slots, unchanged: their steps were
    # neither sampled nor scored again
    first_sweep = {n.id for n in record.tree if n.sweep == 0}
    for i in (0, 1):
        [leaf] = [n for n in record.tree if n.completion == i]
        assert leaf.id in first_sweep
    assert all(n.sweep == 1 for n in record.tree if n.completion in (2, 3))
    assert "sweep 1: reference particles" in " ".join(record.notes)
    # the budget: every sampled step is a node, and the tokens counted are theirs
    assert spent.completion_tokens == sum(n.tokens for n in record.tree)
    assert spent.completion_tokens > usage[1][1].completion_tokens
    assert spent.prm_calls > usage[1][1].prm_calls


def test_records_do_not_depend_on_the_search_batch_nor_on_continuous_feeding():
    problems = builtin_problems()[:5]
    script = {p.problem: [f"Work.[s=0.6]\n\nMore.[s=0.7]\n\nSo \\boxed{{{p.answer}}}[s=0.9]",
                          "Try.[s=0.4]\n\nSo \\boxed{0}[s=0.3]", "Hmm.[s=0.2]\n\nSo \\boxed{1}[s=0.5]"] for p in problems}
    base = dict(approach="particle_filtering", n=4, num_iterations=4, pg_iterations=2, seed=11,
                model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL)
    together = run_search(Recipe(**base, search_batch_size=5), problems, FakePolicy(script), FakePRM())
    alone = run_search(Recipe(**base, search_batch_size=1), problems, FakePolicy(script), FakePRM())
    fed = pf(problems, StreamingPolicy(script, order=2), FakePRM(), Recipe(**base))
    assert [r.to_dict() for r in alone] == [r.to_dict() for r in together] == [r.to_dict() for r in fed]


def test_pf_selection_sample_draws_a_finished_particle_by_weight():
    counts = {}
    for seed in range(200):
        [r] = pf([Problem("p", "P", "2")], StepPolicy(WORLD), FakePRM(), recipe(seed=seed, pf_selection="sample"))
        assert r.finished[r.selected]
        counts[r.pred] = counts.get(r.pred, 0) + 1
    assert "3" not in counts  # the step that scored 0 never survived to be an answer
    assert counts.get("2", 0) > counts.get("0", 0)  # C (0.8) is drawn far more often than A (0.2)


def test_records_round_trip_and_other_strategies_read_as_before():
    [r] = pf([Problem("p", "P", "2")], StepPolicy(WORLD), FakePRM(), recipe())
    back = Record.from_dict(r.to_dict())
    assert back.to_dict() == r.to_dict() and back.tree[0].weight == r.tree[0].weight
    beam = STRATEGIES["beam_search"]([Problem("p", "P", "2")], StepPolicy(WORLD), FakePRM(),
                                     Recipe(approach="beam_search", n=2, beam_width=2, num_iterations=2))
    assert all(set(node) & {"sweep", "weight", "copies"} == set() for node in beam[0].to_dict()["tree"])


def test_bad_particle_settings_are_refused_by_name():
    with pytest.raises(RecipeError, match="pg_reference_particles=4 leaves no free particle of n=4"):
        build_recipe({"approach": "particle_filtering", "n": 4, "pg_iterations": 2, "pg_reference_particles": 4})
    with pytest.raises(RecipeError, match="lookahead=1 does not apply to particle_filtering"):
        build_recipe({"approach": "particle_filtering", "lookahead": 1})
    with pytest.raises(RecipeError, match="pf_temperature"):
        build_recipe({"approach": "particle_filtering", "pf_temperature": 0})
    r = build_recipe({"approach": "particle_filtering"})
    assert {"pf_temperature", "pg_iterations"} <= set(r.params()) and "beam_width" not in r.params()
    assert "pf_temperature" not in build_recipe({"approach": "beam_search"}).params()
    assert names.run_name(build_recipe({"approach": "particle_filtering", "pg_iterations": 3})).endswith("-n4-pg3")


class Dying(FakePolicy):
    """Killed when the second search batch starts (its first problem's prompt arrives)."""

    def __init__(self, script, problem):
        super().__init__(script)
        self.problem = problem

    def generate(self, prompts, sampling, seeds):
        if any(self.problem in p for p in prompts):
            raise KeyboardInterrupt("killed")
        return super().generate(prompts, sampling, seeds)


def test_a_killed_particle_filter_resumes_to_the_same_records(mlflow_store):
    from ttc_mlops.pipeline.run_chunk import run_chunk

    problems = builtin_problems()[:4]
    script = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.9]", "So \\boxed{0}[s=0.1]",
                          "Hmm.[s=0.3]\n\nStill.[s=0.4]\n\nSo \\boxed{1}[s=0.5]"] for p in problems}
    r = Recipe(approach="particle_filtering", n=4, num_iterations=3, seed=2, search_batch_size=2, num_samples=4,
               model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET,
               experiment_name="pf")
    with pytest.raises(BaseException, match="killed"):
        run_chunk(r, Dying(script, problems[2].problem), FakePRM(), progress=False)
    resumed = run_chunk(r, FakePolicy(script), FakePRM(), progress=False)
    fresh = run_chunk(r.model_copy(update={"experiment_name": "pf-fresh"}), FakePolicy(script), FakePRM(),
                      progress=False)
    assert resumed.resumed_from == 2
    assert [x.to_dict() for x in resumed.records] == [x.to_dict() for x in fresh.records]
    assert resumed.metrics[names.M_GENERATE_CALLS] == fresh.metrics[names.M_GENERATE_CALLS]
