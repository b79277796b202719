"""The transformers policy and the RLHFlow PRM on a tiny random Llama (real plumbing, fast)."""

import functools

import pytest

from ttc_mlops.config import Recipe
from ttc_mlops.policy import Sampling


@pytest.fixture(scope="module")
def policy(tiny_llama_dir):
    from ttc_mlops.policy.hf import HFPolicy

    return HFPolicy(Recipe(model_path=str(tiny_llama_dir), dtype="float32", device="cpu").policy_settings)


@pytest.fixture(scope="module")
def prm(tiny_llama_dir):
    from ttc_mlops.prm.rlhflow import RLHFlowPRM

    return RLHFlowPRM(Recipe(prm_path=str(tiny_llama_dir), prm_family="rlhflow", dtype="float32", device="cpu",
                             prm_batch_size=3).prm_settings)


def test_finish_reasons_token_counts_and_delimiter(policy):
    prompt = policy.chat_prompt("sys", "What is 1+1?")
    gens = policy.generate([prompt] * 12, Sampling(temperature=1.5, max_tokens=40, stop=("\n\n",)), list(range(12)))
    for g in gens:
        assert 1 <= g.num_tokens <= 40
        if g.finish_reason == "stop":
            assert g.text.endswith("\n\n") and g.text.count("\n\n") == 1
        elif g.finish_reason == "length":
            assert g.num_tokens == 40
    lengths = policy.generate([prompt] * 3, Sampling(max_tokens=5), [1, 2, 3])
    assert all(g.finish_reason in ("length", "eos") and g.num_tokens <= 5 for g in lengths)


def test_eos_is_reported(policy, monkeypatch):
    real = policy.model.forward
    eos = policy.tokenizer.eos_token_id

    @functools.wraps(real)  # keeps the signature: the backend passes the cache by the name it takes
    def eos_first(*args, **kwargs):  # the model now always wants to end the answer
        out = real(*args, **kwargs)
        out.logits[..., eos] = 1e4
        return out

    monkeypatch.setattr(policy.model, "forward", eos_first)
    (g,) = policy.generate([policy.chat_prompt("", "hi")], Sampling(temperature=0.7, max_tokens=10), [0])
    assert (g.finish_reason, g.num_tokens, g.text) == ("eos", 1, "")


def test_seeds_reproduce_and_ignore_batch_neighbours(policy):
    s = Sampling(temperature=1.0, max_tokens=12)
    a = policy.chat_prompt("", "Problem A, a long one with several more words in it")
    b = policy.chat_prompt("", "B")
    together = policy.generate([a, b, a], s, [7, 8, 9])
    alone = policy.generate([a], s, [9])
    assert together[2] == alone[0]
    assert policy.generate([b], s, [8])[0] == together[1]
    assert together[0].text != together[2].text or together[0].num_tokens != together[2].num_tokens


def test_prm_scores_every_step_in_range_and_caches(prm):
    comps = [["Step one.\n\nStep two.\n\n\\boxed{2}", "Just \\boxed{3}\n\n"], ["a\n\nb"]]
    scores = prm.score(["1+1?", "2+2?"], comps)
    assert [len(s) for s in scores[0]] == [3, 1] and [len(s) for s in scores[1]] == [2]
    assert all(0.0 <= v <= 1.0 for p in scores for c in p for v in c)
    before = prm.tokens_processed
    assert prm.score(["1+1?"], [comps[0]]) == [scores[0]]
    assert prm.tokens_processed == before  # nothing re-run


def test_prm_step_score_matches_a_single_unbatched_forward(prm):
    import torch

    problem, steps = "What is 2+2?", ["Two plus two.", "It is \\boxed{4}."]
    (batched,) = prm.score([problem], [["\n\n".join(steps)]])
    msgs = [{"role": "user", "content": f"{problem} {steps[0]}"}, {"role": "assistant", "content": "+"},
            {"role": "user", "content": steps[1]}]
    prefix = prm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = prm.tokenizer(prefix, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = prm.model(ids).logits[0, -1, [prm.plus_id, prm.minus_id]].float()
    assert batched[0][1] == pytest.approx(float(logits.softmax(-1)[0]), abs=1e-5)


def test_identical_prompts_share_one_prefill_and_keep_their_own_samples(policy):
    s = Sampling(temperature=1.0, max_tokens=10)
    a, b = policy.chat_prompt("", "Same prompt twice"), policy.chat_prompt("", "Other")
    together = policy.generate([a, b, a, a], s, [1, 2, 3, 4])
    assert [policy.generate([p], s, [seed])[0] for p, seed in ((a, 3), (b, 2), (a, 1))] == \
        [together[2], together[1], together[0]]
    assert len({g.text for g in (together[0], together[2], together[3])}) > 1  # seeds still differ


def test_sampling_follows_the_distribution_and_never_draws_a_cut_token():
    import torch

    from ttc_mlops.policy.hf import HFPolicy

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).repeat(4000, 1)
    draws = HFPolicy._sample(logits, Sampling(temperature=1.0, top_p=1.0),
                             [torch.Generator().manual_seed(s) for s in range(4000)])
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.03)
    nucleus = HFPolicy._sample(logits, Sampling(temperature=1.0, top_p=0.75),
                               [torch.Generator().manual_seed(s) for s in range(4000)])
    assert set(nucleus) == {0, 1}  # 0.5 + 0.3 reaches top_p: the tail is never drawn
    again = HFPolicy._sample(logits[:3], Sampling(temperature=1.0), [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    assert again == draws[7:10]  # a row's draw depends on its own seed only


def test_trust_remote_code_says_what_will_run(tiny_llama_dir, tmp_path, caplog):
    import shutil

    from ttc_mlops.models import load_causal_lm

    model = tmp_path / "with-code"
    shutil.copytree(tiny_llama_dir, model)
    (model / "modeling_custom.py").write_text("# a checkpoint's own code\n")
    settings = Recipe(model_path=str(model), dtype="float32", device="cpu", trust_remote_code=True).policy_settings
    with caplog.at_level("WARNING", logger="ttc_mlops.models"):
        load_causal_lm(settings)
    assert f"trust_remote_code=true: loading {model} runs the Python code it ships (modeling_custom.py)" in caplog.text


def test_shared_prompt_decoding_samples_what_copied_caches_sample(policy, monkeypatch):
    """Samples of one prompt decode over its keys and values held once; with the cache copied per
    row (where a model cannot share) every sample is the same, rows leaving at different steps."""
    assert policy.shared_prompts
    s = Sampling(temperature=1.2, max_tokens=30, stop=("x",))  # rows stop at different steps
    a, b = policy.chat_prompt("", "A prompt three samples share"), policy.chat_prompt("", "Two share this")
    prompts, seeds = [a, b, a, b, a, policy.chat_prompt("", "one")], [5, 6, 7, 8, 9, 10]
    shared = policy.generate(prompts, s, seeds)
    assert len({g.num_tokens for g in shared}) > 1  # the batch shrank mid-run
    monkeypatch.setattr(policy, "shared_prompts", False)
    assert policy.generate(prompts, s, seeds) == shared


def test_stream_admits_requests_mid_run_and_samples_what_generate_and_alone_sample(policy, monkeypatch):
    """Requests added while others decode join the running batch (other settings, other prompts,
    more than `max_batch` of them queueing); each samples what it samples in `generate` and alone."""
    s, other = Sampling(temperature=1.2, max_tokens=30, stop=("x",)), Sampling(temperature=0.9, max_tokens=12)
    a, b, c = (policy.chat_prompt("", q) for q in ("A prompt two samples share", "Another", "A third, late one"))
    from ttc_mlops.policy import kvcache

    joins = []
    monkeypatch.setattr(kvcache, "join_prompts", lambda *args, join=kvcache.join_prompts: joins.append(1) or join(*args))
    monkeypatch.setattr(policy, "continuous", True, raising=False)  # the default; waves without it
    stream = policy.stream()
    assert stream.continuous
    first = stream.add([a, a, b], s, [1, 2, 3])
    got = dict(stream.collect())
    assert got and stream.busy()  # some finished, the others still decode
    monkeypatch.setattr(policy, "max_batch", 3)  # of the late requests, some wait for rows to leave
    later = stream.add([c, a, c], other, [4, 5, 6])
    while stream.busy():
        got.update(stream.collect())
    assert joins  # late requests joined a running batch
    assert [got[t] for t in first] == policy.generate([a, a, b], s, [1, 2, 3])
    assert [got[t] for t in later] == policy.generate([c, a, c], other, [4, 5, 6])
    assert [got[t] for t in later[:2]] == [policy.generate([c], other, [4])[0], policy.generate([a], other, [5])[0]]
    assert not stream.collect()


def test_a_batch_fed_continuously_drops_positions_no_row_attends_to(policy, monkeypatch):
    """Rows that leave a running batch leave prompt padding and own positions (written before the
    rows now decoding joined) that nobody attends to: they are dropped, and every row still samples
    what it samples alone."""
    from ttc_mlops.policy import kvcache

    trims = []

    def spy(cache, attention, trim=kvcache.trim_unattended):
        out = trim(cache, attention)
        trims.append((attention.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(kvcache, "trim_unattended", spy)
    long, short, late = (policy.chat_prompt("", q) for q in ("A much longer question " * 12, "Short", "Late"))
    quick, slow = Sampling(temperature=1.0, max_tokens=20), Sampling(temperature=1.0, max_tokens=48)
    monkeypatch.setattr(policy, "continuous", True, raising=False)
    stream = policy.stream()
    (t_long,) = stream.add([long], quick, [1])
    (t_short,) = stream.add([short], slow, [2])
    got = dict(stream.collect())
    assert t_long in got and stream.busy()  # the long prompt's row left; the short one decodes on
    (t_late,) = stream.add([late], slow, [3])
    while stream.busy():
        got.update(stream.collect())
    assert sum(after < before for before, after in trims) == 2  # the long prompt's padding, then the own positions
    assert got[t_long] == policy.generate([long], quick, [1])[0]
    assert got[t_short] == policy.generate([short], slow, [2])[0]
    assert got[t_late] == policy.generate([late], slow, [3])[0]


def _bf16_llama(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()


def test_bf16_linear_layers_multiply_by_a_prepacked_copy_and_compute_what_they_did(tiny_llama_dir):
    """`pack_linears`: every bf16 linear layer multiplies by its weight prepacked for oneDNN, and the
    logits stay bit for bit what `F.linear` gave (so no sample changes)."""
    import torch

    from ttc_mlops.models import pack_linears

    model = _bf16_llama(tiny_llama_dir)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        packed = pack_linears(model)
        if packed == 0:
            pytest.skip("this CPU's oneDNN has no bf16 kernels")
        assert packed == len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the output layer
        assert torch.equal(model(input_ids=ids).logits, before)
        for layer in linears:  # the weights no longer take part: the packed copies do
            layer.weight.zero_()
        assert torch.equal(model(input_ids=ids).logits, before)


def test_packed_layers_multiply_by_their_weights_where_gradients_are_tracked(tiny_llama_dir):
    import torch

    from ttc_mlops.models import pack_linears

    model = _bf16_llama(tiny_llama_dir)
    if pack_linears(model) == 0:
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        inferred = model(input_ids=ids).logits
    tracked = model(input_ids=ids).logits
    assert torch.equal(tracked.detach(), inferred)
    tracked.float().sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_float32_and_loaded_models(tiny_llama_dir):
    """Only bf16 layers are packed (float32 products differ between MKL and oneDNN); the policy's
    loader packs the model it loads."""
    import torch
    from transformers import AutoModelForCausalLM

    from ttc_mlops.config import Recipe
    from ttc_mlops.models import load_causal_lm, pack_linears

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert pack_linears(fp32) == 0
    assert all(type(m) is torch.nn.Linear for m in fp32.modules() if isinstance(m, torch.nn.Linear))
    if pack_linears(_bf16_llama(tiny_llama_dir)) == 0:
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    model, _, _ = load_causal_lm(Recipe(model_path=str(tiny_llama_dir), dtype="bfloat16", device="cpu").policy_settings)
    assert all(hasattr(m, "packed") for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_a_model_whose_packed_copies_would_crowd_memory_is_left_as_it_is(tiny_llama_dir, monkeypatch, caplog):
    import torch

    from ttc_mlops import models

    model = _bf16_llama(tiny_llama_dir)
    weights = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(models, "available_memory", lambda: int(weights / models.PACK_MEMORY_SHARE) - 1)
    with caplog.at_level("INFO", logger="ttc_mlops.models"):
        assert models.pack_linears(model) == 0
    assert "not prepacked" in caplog.text
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(models, "available_memory", lambda: int(weights / models.PACK_MEMORY_SHARE) + 1)
    if models.pack_linears(model) == 0:
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    assert all(hasattr(m, "packed") for m in model.modules() if isinstance(m, torch.nn.Linear))
