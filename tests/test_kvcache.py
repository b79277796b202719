"""Prefix key/value reuse: the store's bookkeeping, and that reuse changes no output (tiny random Llama)."""

import pytest
import torch

from ttc_mlops.config import Recipe
from ttc_mlops.policy import Sampling
from ttc_mlops.policy.kvcache import BLOCK, PrefixStore, prefill, row_kv


def kv_of(n: int, fill: float = 0.0):
    return torch.full((2, 2, 1, n, 4), fill)  # layers x 2 x heads x tokens x dim, 4 bytes each


def test_match_finds_the_longest_prefix_within_the_limit():
    store = PrefixStore(1 << 20)
    a = list(range(100))
    b = list(range(40)) + [999] * 30
    store.add(a, lambda: kv_of(len(a)))
    store.add(b, lambda: kv_of(len(b)))
    assert store.match(list(range(60)) + [5, 5])[1] == 60
    assert store.match(list(range(40)) + [999, 1])[1] == 41  # b, beyond its last full block
    assert store.match(a + [7])[1] == 100
    assert store.match(a + [7], limit=90)[1] == 90
    assert store.match([5] * 50) == (None, 0)
    assert store.match(list(range(10))) == (None, 0)  # shorter than a block: nothing to hash


def test_an_entry_that_a_newer_one_extends_is_dropped_and_covered_ones_are_not_stored():
    store = PrefixStore(1 << 20)
    prompt = list(range(3 * BLOCK))
    store.add(prompt, lambda: kv_of(len(prompt)))
    store.add(prompt + [1, 2, 3], lambda: kv_of(len(prompt) + 3))
    assert len(store) == 1 and store.match(prompt + [1, 2, 3, 4])[1] == len(prompt) + 3

    def fail():
        raise AssertionError("a covered sequence must not be copied")

    store.add(prompt[:-5], fail)
    store.add(prompt + [1, 2, 3], fail)
    assert len(store) == 1
    store.add(prompt + [9], lambda: kv_of(len(prompt) + 1))  # a sibling: both stay
    assert len(store) == 2 and store.match(prompt + [9, 9])[1] == len(prompt) + 1


def test_least_recently_used_entries_leave_beyond_the_budget():
    per_token = kv_of(1).numel() * 4
    store = PrefixStore(per_token * 100)
    seqs = [[k] * 40 for k in range(3)]
    for s in seqs[:2]:
        store.add(s, lambda s=s: kv_of(len(s)))
    store.match(seqs[0] + [1])  # seqs[0] is now the most recently used
    store.add(seqs[2], lambda: kv_of(40))
    assert store.nbytes <= store.budget
    assert store.match(seqs[1] + [1]) == (None, 0)
    assert store.match(seqs[0] + [1])[1] == 40 and store.match(seqs[2] + [1])[1] == 40
    store.add([7] * 200, lambda: kv_of(200))  # larger than the whole budget: not kept
    assert store.match([7] * 201) == (None, 0) and len(store) == 2
    PrefixStore(0).add(seqs[0], lambda: pytest.fail("a zero budget keeps nothing"))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from ttc_mlops.models import load_causal_lm

    return load_causal_lm(Recipe(model_path=str(tiny_llama_dir), dtype="float32", device="cpu").policy_settings)


@pytest.mark.parametrize("grouped", [False, True])
def test_prefill_with_cached_prefixes_gives_the_plain_forward_logits(tiny, grouped, monkeypatch):
    from ttc_mlops.policy import kvcache

    if not grouped:  # no pass ahead in groups of similar length: the cached prefixes go in as they are
        monkeypatch.setattr(kvcache, "PADDING_WASTE", 1.0)
    model, tok, _ = tiny
    texts = ["The first row, a fairly long one with many words in it.",
             "Second row, which is also long enough for a few blocks of tokens.", "The first row, but then not."]
    rows = [tok(t, add_special_tokens=False).input_ids * 3 for t in texts]
    store = PrefixStore(1 << 26)
    for cut, ids in zip((len(rows[0]) - 2, 20, 0), rows):  # cached prefixes of 3 lengths, one none
        if cut >= BLOCK:
            first = prefill(model, [ids[:cut]], None, tok.pad_token_id, logits_to_keep=1)
            store.add(ids[:cut], lambda first=first: row_kv(first.cache, 0, first.attention[0]))
    pre = prefill(model, rows, store, tok.pad_token_id, logits_to_keep=1)
    if grouped:  # rows 1 and 2 missed far more than row 0: they ran ahead, so the pass reuses all but the last
        assert pre.reused == [len(rows[0]) - 2, len(rows[1]) - 1, len(rows[2]) - 1]
    else:
        assert pre.reused == [len(rows[0]) - 2, 20, 0]
    assert pre.ran == 2 + len(rows[1]) - 20 + len(rows[2])  # what the store lacked, run once
    with torch.inference_mode():
        for r, ids in enumerate(rows):
            plain = model(torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(pre.out.logits[r, -1], plain, atol=1e-4)


@pytest.fixture(scope="module")
def policies(tiny_llama_dir):
    from ttc_mlops.policy.hf import HFPolicy

    make = lambda gib: HFPolicy(Recipe(model_path=str(tiny_llama_dir), dtype="float32", device="cpu",  # noqa: E731
                                       prefix_cache_gib=gib).policy_settings)
    return make(1.0), make(0.0)


def test_a_search_reuses_its_prompts_and_steps_without_changing_any_sample(policies):
    reuse, plain = policies
    s = Sampling(temperature=1.0, max_tokens=24, stop=("\n\n",))
    prompts = [reuse.chat_prompt("Think step by step.", q) for q in ("What is 2+2?", "Name a prime above 10.")]
    seeds = [1, 2, 3, 4]
    for depth in range(3):  # three search iterations: each prompt grows by its sampled step
        batch = [prompts[0], prompts[0], prompts[1], prompts[1]]
        a, b = reuse.generate(batch, s, seeds), plain.generate(batch, s, seeds)
        assert a == b
        prompts = [batch[0] + a[0].text, batch[2] + a[2].text]
        seeds = [x + 10 for x in seeds]
    assert reuse.store.hit_tokens > reuse.store.miss_tokens  # most of every prompt came from the store
    assert plain.store.hit_tokens == 0


def test_prm_reuse_scores_only_the_new_step_and_changes_no_score(tiny_llama_dir):
    from ttc_mlops.prm.rlhflow import RLHFlowPRM

    make = lambda gib: RLHFlowPRM(Recipe(prm_path=str(tiny_llama_dir), prm_family="rlhflow", dtype="float32",  # noqa: E731
                                         device="cpu", prm_batch_size=4, prefix_cache_gib=gib).prm_settings)
    reuse, plain = make(1.0), make(0.0)
    problem = "A long enough problem statement: what is the sum of the first ten positive integers?"
    steps = ["Pair them up: 1+10, 2+9 and so on.\n\n", "Five pairs of 11.\n\n", "So the sum is \\boxed{55}.\n\n"]
    grown = [["".join(steps[:k])] for k in range(1, 4)]
    for comps in grown:
        full_before = plain.tokens_processed
        before = reuse.tokens_processed
        (got,), (want,) = reuse.score([problem], [comps]), plain.score([problem], [comps])
        assert got[0] == pytest.approx(want[0], abs=1e-5)
        if comps is not grown[0]:  # a grown beam: only its new step runs
            assert reuse.tokens_processed - before < (plain.tokens_processed - full_before) / 2
    siblings = [steps[0], "Or use n(n+1)/2.\n\n", "Add them one by one.\n\n"]
    fresh = make(1.0)
    fresh.score(["Another problem, with a statement long enough to share?"], [siblings])
    plain.clear_cache()
    plain.score(["Another problem, with a statement long enough to share?"], [siblings])
    assert fresh.tokens_processed < plain.tokens_processed  # the problem ran once for three candidates


def test_prm_batches_attend_little_padding_and_change_no_score(tiny_llama_dir):
    """Beams of very different depths in one PRM call: batches group similar histories and new
    lengths, so a padded pass attends at most 1.5x what its rows attend alone, and every score is
    the one a row scored alone gets."""
    from ttc_mlops.prm.rlhflow import RLHFlowPRM
    from ttc_mlops.prm.stepwise import PADDED_ATTENTION

    make = lambda size: RLHFlowPRM(Recipe(prm_path=str(tiny_llama_dir), prm_family="rlhflow", dtype="float32",  # noqa: E731
                                          device="cpu", prm_batch_size=size).prm_settings)
    grouped, alone = make(8), make(1)
    problems = ["What is 2+2?", "A long enough problem statement: what is the sum of the first ten positive integers, "
                "and what is the sum of their squares?"]
    step = lambda k, w: f"Step {k}: " + " ".join(["work"] * w) + ".\n\n"  # noqa: E731
    beams = [["".join(step(k, 3 + 7 * (b % 3)) for k in range(depth)) for b, depth in enumerate((1, 2, 5, 6, 1, 3))]
             for _ in problems]
    for depth_grown in range(3):  # three iterations: the histories differ in length, so does the new step
        comps = [[c + step(9 + depth_grown, 2 + 11 * (i % 2)) for i, c in enumerate(row)] for row in beams]
        got, want = grouped.score(problems, comps), alone.score(problems, comps)
        flat = lambda nested: [x for row in nested for scores in row for x in scores]  # noqa: E731
        assert flat(got) == pytest.approx(flat(want), abs=1e-5)
        beams = comps
    assert grouped.attended <= PADDED_ATTENTION * grouped.attended_alone
    assert alone.attended == alone.attended_alone  # one row a pass: nothing padded


def test_prm_scores_of_problems_scored_one_call_each_are_kept(tiny_llama_dir, monkeypatch):
    """A search fed continuously scores one problem per call: coming back for a new step, a problem
    finds its earlier steps' scores, whatever was scored in between; beyond RECENT_PROBLEMS the
    oldest problems leave."""
    from ttc_mlops.prm import stepwise
    from ttc_mlops.prm.rlhflow import RLHFlowPRM

    prm = RLHFlowPRM(Recipe(prm_path=str(tiny_llama_dir), prm_family="rlhflow", dtype="float32",
                            device="cpu").prm_settings)
    problems = ["What is 2+2?", "What is the sum of the first ten positive integers?"]
    first = ["Add the numbers.\n\n", "Pair them up.\n\n"]
    scored = [prm.score([p], [[step]])[0][0][0] for p, step in zip(problems, first)]
    ran = []
    monkeypatch.setattr(prm, "_run", lambda rows: ran.extend(rows) or RLHFlowPRM._run(prm, rows))
    (two,) = prm.score([problems[0]], [[first[0] + "So \\boxed{4}.\n\n"]])[0]
    assert two[0] == scored[0] and [r.first_new for r in ran] == [1]  # only the new step was scored
    monkeypatch.setattr(stepwise, "RECENT_PROBLEMS", 1)
    prm.score([problems[1]], [[first[1]]])
    assert {problem for problem, _ in prm._scores} == {problems[1]}


PROMPTS = ("A prompt that several rows sample from, long enough to pad the others.", "A short one.",
           "A third prompt, of middling length.")


@pytest.mark.parametrize(("rows", "kept", "joined"), [([0, 1, 0, 0], [0, 3], None), ([0, 1, 2], [0, 2], None),
                                                      ([1, 1], [1], [0, 2, 0])])
def test_decoding_over_shared_prompts_gives_the_plain_forward_logits_and_keys(tiny, rows, kept, joined, monkeypatch):
    """Rows sampling from prompts (several from one, or one each) decode over a cache that holds each
    prompt once; rows leave mid-run (the last one moves into a hole), rows of other prompts join it
    (a longer prompt pads the running ones). Every step's logits, and every row's keys and values,
    are those of a plain forward pass over the row's whole sequence."""
    from ttc_mlops.policy import kvcache

    model, tok, _ = tiny
    assert kvcache.use_decode_attention(model)
    monkeypatch.setattr(kvcache, "ROOM", 8)  # the rows' own buffers grow twice
    prompts = [tok(t, add_special_tokens=False).input_ids for t in PROMPTS]

    def prefilled(rows):
        pre = prefill(model, [prompts[r] for r in sorted(set(rows))], PrefixStore(0), tok.pad_token_id,
                      logits_to_keep=1)
        index = torch.tensor([sorted(set(rows)).index(r) for r in rows])
        return pre, index.tolist(), pre.attention[index], pre.positions[index, -1:]

    pre, local, attention, positions = prefilled(rows)
    kvcache.share_prompts(pre.cache, local)
    cache, seqs = pre.cache, [list(prompts[r]) for r in rows]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for step in range(20):
            if step == 5:  # the other rows finish: the last one moves into slot 1
                keep_rows = torch.tensor(kept)
                cache.batch_select_indices(keep_rows)
                attention, positions, seqs = attention[keep_rows], positions[keep_rows], [seqs[r] for r in kept]
            if step == 7 and joined:
                new, local, new_attention, new_positions = prefilled(joined)
                attention = kvcache.join_prompts(cache, new.cache, local, attention, new_attention)
                positions, seqs = torch.cat([positions, new_positions]), seqs + [list(prompts[r]) for r in joined]
            ids = torch.randint(0, 1000, (len(seqs), 1), generator=gen)
            for seq, i in zip(seqs, ids.tolist()):
                seq += i
            attention = torch.cat([attention, attention.new_ones((len(seqs), 1))], dim=-1)
            positions = positions + 1
            out = model(input_ids=ids, attention_mask=kvcache.decode_mask(cache, attention, model.dtype),
                        position_ids=positions, use_cache=True, **{kvcache.cache_kwarg(model): cache})
            plain = [model(torch.tensor([seq]), use_cache=True) for seq in seqs]
            for r, p in enumerate(plain):
                assert torch.allclose(out.logits[r, -1], p.logits[0, -1], atol=1e-4)
    for r, p in enumerate(plain):
        kv = row_kv(cache, r, attention[r])
        want = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in p.past_key_values.layers])
        assert torch.allclose(kv, want, atol=1e-5)
