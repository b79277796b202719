"""Continuous feeding of step-level search: the same records as lockstep waves, whatever the order
in which a backend finishes requests, while problems move on independently."""

import pytest
from fakes import FakePolicy, FakePRM, StreamingPolicy

from ttc_mlops.config import Recipe
from ttc_mlops.data import Problem
from ttc_mlops.policy import Sampling, Waves, open_stream
from ttc_mlops.strategies import STRATEGIES

SCRIPT = {
    "1+1?": ["Add.[s=0.9]\n\nOne and one.[s=0.6]\n\nSo \\boxed{2}[s=0.8]", "Guess.[s=0.7]\n\nSo \\boxed{3}[s=0.2]",
             "Hmm.[s=0.1]\n\nThink.[s=0.5]\n\nWait.[s=0.4]\n\nSo \\boxed{2}[s=0.95]",
             "Add.[s=0.9]\n\nSo \\boxed{2}[s=0.85]"],
    "2+2?": ["Two twos.[s=0.7]\n\nSo \\boxed{4}[s=0.7]", "So \\boxed{5}[s=0.3]",
             "Count.[s=0.4]\n\nFour.[s=0.8]\n\nYes.[s=0.6]\n\nSo \\boxed{4}[s=0.9]"],
    "3+3?": ["Six.[s=0.6]\n\nSo \\boxed{6}[s=0.9]", "Three and three.[s=0.5]\n\nSo \\boxed{7}[s=0.4]",
             "Double.[s=0.8]\n\nThree.[s=0.3]\n\nAgain.[s=0.7]\n\nSo \\boxed{6}[s=0.6]"],
}
PROBLEMS = [Problem("a", "1+1?", "2"), Problem("b", "2+2?", "4"), Problem("c", "3+3?", "6")]


class CountingPRM(FakePRM):
    def __init__(self):
        super().__init__()
        self.problems: list[list[str]] = []  # the problems of each call

    def score(self, problems, completions):
        self.problems.append(list(problems))
        return super().score(problems, completions)


def recipe(approach, **kw):
    return Recipe(**{"approach": approach, "n": 4, "beam_width": 2, "num_iterations": 4, "seed": 3,
                     "sort_completed": True, **kw})


@pytest.mark.parametrize("approach", ["beam_search", "dvts"])
@pytest.mark.parametrize("lookahead", [0, 1])
def test_continuous_feeding_gives_the_records_of_lockstep_waves(approach, lookahead):
    r = recipe(approach, lookahead=lookahead)
    search = STRATEGIES[approach]
    lockstep = search(PROBLEMS, FakePolicy(SCRIPT), FakePRM(), r)
    for order in range(3):  # different finishing orders
        policy = StreamingPolicy(SCRIPT, order=order)
        prm = CountingPRM()
        fed = search(PROBLEMS, policy, prm, r)
        assert [x.to_dict() for x in fed] == [x.to_dict() for x in lockstep]
        # problems moved on alone: PRM calls scored fewer than all problems, more calls than iterations
        assert min(len(set(p)) for p in prm.problems) < len(PROBLEMS)
        assert len(prm.problems) > r.num_iterations
        assert not policy.streams[0].busy()


def test_a_problem_moves_on_while_others_still_generate():
    policy = StreamingPolicy(SCRIPT)
    STRATEGIES["beam_search"](PROBLEMS, policy, FakePRM(), recipe("beam_search"))
    [stream] = policy.streams
    first = stream.busy_at_add[: len(PROBLEMS)]
    assert first == [0, 4, 8]  # iteration 0 of every problem at once
    # later iterations went in while other requests were still running (waves would wait for none)
    assert max(stream.busy_at_add[len(PROBLEMS):]) > 0


def test_a_dvts_subtree_moves_on_while_its_sibling_still_generates():
    policy = StreamingPolicy(SCRIPT, order=2)
    beside = []  # for every add after the first iteration: requests of the same problem in flight
    STRATEGIES["dvts"](PROBLEMS, policy, FakePRM(), recipe("dvts"))
    [stream] = policy.streams
    for prompts, queued in stream.adds[2 * len(PROBLEMS):]:  # two subtrees per problem (n=4, M=2)
        question = next(q for q in SCRIPT if q in prompts[0])
        beside.append(sum(question in p for p in queued))
    # a problem-wide barrier would never add a problem's requests while any of its own run
    assert max(beside) > 0


def test_waves_run_one_generate_call_per_iteration_for_all_problems():
    policy = FakePolicy(SCRIPT)
    prm = CountingPRM()
    STRATEGIES["beam_search"](PROBLEMS, policy, prm, recipe("beam_search", num_iterations=3))
    assert len(policy.calls) == 3 and len(prm.problems) == 3
    assert len(policy.calls[0]) == 4 * len(PROBLEMS)


def test_waves_group_requests_by_sampling_and_keep_their_order():
    policy = FakePolicy(SCRIPT)
    stream = open_stream(policy)
    assert isinstance(stream, Waves) and not stream.continuous
    prompts = [policy.chat_prompt("", q) for q in SCRIPT]
    a = stream.add(prompts[:2], Sampling(max_tokens=50, stop=("\n\n",)), [1, 2])
    b = stream.add(prompts[2:], Sampling(max_tokens=50), [3])
    c = stream.add(prompts[:1], Sampling(max_tokens=50, stop=("\n\n",)), [4])
    assert stream.busy() == 4
    done = dict(stream.collect())
    assert sorted(done) == a + b + c and not stream.busy() and stream.collect() == []
    assert [len(call) for call in policy.calls] == [3, 1]  # one call per sampling setting
    assert policy.calls[0] == [prompts[0], prompts[1], prompts[0]]
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        stream.add(prompts[:2], Sampling(), [1])


def test_the_meter_counts_a_continuous_stream():
    from ttc_mlops.runner import metered

    policy, prm = metered(StreamingPolicy(SCRIPT), FakePRM())
    records = STRATEGIES["dvts"](PROBLEMS, policy, prm, recipe("dvts"))
    made = sum(node.tokens for rec in records for node in rec.tree)
    meter = policy.usage
    assert meter.completion_tokens == made > 0
    assert meter.generate_calls > 0 and meter.gen_s > 0 and meter.prm_calls > 0


@pytest.mark.parametrize("approach", ["beam_search", "dvts"])
def test_the_transformers_backend_searches_continuously_or_in_waves_and_either_gives_the_same_records(
        tiny_llama_dir, approach):
    """HFPolicy feeds a step-level search continuously on a CPU by default; with `continuous` off it
    has no `stream` and runs lockstep waves. In float32 the records are the same, field by field."""
    from ttc_mlops.policy import Streaming
    from ttc_mlops.policy.hf import HFPolicy

    r = Recipe(model_path=str(tiny_llama_dir), dtype="float32", device="cpu", approach=approach, n=4, beam_width=2,
               num_iterations=3, max_tokens=10, temperature=1.0, seed=5, sort_completed=True)
    policy = HFPolicy(r.policy_settings)
    assert isinstance(policy, Streaming) and open_stream(policy).continuous
    policy.continuous = False
    problems = [Problem("p", "What is 2+2?", "4"), Problem("q", "Name a prime number above ten, please.", "11")]
    assert not isinstance(policy, Streaming) and isinstance(open_stream(policy), Waves)
    waves = STRATEGIES[approach](problems, policy, FakePRM(), r)
    policy.continuous = True
    assert isinstance(policy, Streaming) and open_stream(policy).continuous
    policy.clear_cache()
    fed = STRATEGIES[approach](problems, policy, FakePRM(), r)
    assert waves == fed  # dataclasses: every field, the tree included
    assert all(w.completions for w in waves)
