"""The Math-Shepherd, Skywork-o1 and Qwen2.5-Math PRM families on tiny random models of their
architectures (Llama and Mistral, Qwen2), checked against the forward each model card writes out,
and their prefix reuse against plain passes."""

import pytest

from ttc_mlops.config import Recipe, RecipeError

PROBLEM = "What is 2+2?"
STEPS = ["Two plus two.", "It is \\boxed{4}."]
COMPLETION = "\n\n".join(STEPS)
LONGER = "First, note that 2+2 is a sum of two numbers.\n\nAdding them gives four.\n\nSo \\boxed{4}.\n\n"


def _tokenizer(tokenizer_dir, *extra):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if extra:
        tok.add_tokens(list(extra), special_tokens=True)
    return tok


def _small(config_cls, tok, **kw):
    return config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **kw)


def _add_tensors(model_dir, tensors):
    """Write extra head tensors into the saved checkpoint, as the published PRMs ship them."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(path)
    state.update(tensors)
    save_file(state, path, metadata={"format": "pt"})


def _recipe(path, family, **kw):
    return Recipe(prm_path=str(path), prm_family=family, dtype="float32", device="cpu", **kw).prm_settings


def _checkpoint(tmp_path_factory, name, tok, architecture, seed):
    """A tiny random `architecture` ("Mistral", "Llama", "Qwen2") causal LM saved with `tok`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{architecture}Config")
    out = tmp_path_factory.mktemp(name)
    getattr(transformers, f"{architecture}ForCausalLM")(_small(config, tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def shepherd_dir(smollm2_tokenizer_dir, tmp_path_factory):
    return _checkpoint(tmp_path_factory, "math-shepherd", _tokenizer(smollm2_tokenizer_dir, "ки"), "Mistral", 1)


@pytest.fixture(scope="module")
def skywork_dir(smollm2_tokenizer_dir, tmp_path_factory):
    import torch

    out = _checkpoint(tmp_path_factory, "skywork", _tokenizer(smollm2_tokenizer_dir), "Qwen2", 2)
    _add_tensors(out, {"v_head.summary.weight": torch.randn(1, 32), "v_head.summary.bias": torch.tensor([0.3])})
    return out


@pytest.fixture(scope="module")
def qwen_prm_dir(smollm2_tokenizer_dir, tmp_path_factory):
    import torch

    out = _checkpoint(tmp_path_factory, "qwen-math-prm", _tokenizer(smollm2_tokenizer_dir, "<extra_0>"), "Qwen2", 3)
    _add_tensors(out, {"score.0.weight": torch.randn(32, 32) / 4, "score.0.bias": torch.randn(32) / 4,
                       "score.2.weight": torch.randn(2, 32), "score.2.bias": torch.randn(2)})
    return out


def _causal_lm(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval(), AutoTokenizer.from_pretrained(path)


def test_math_shepherd_format_positions_and_scores(shepherd_dir):
    import torch

    from ttc_mlops.prm.math_shepherd import MathShepherdPRM

    prm = MathShepherdPRM(_recipe(shepherd_dir, "math_shepherd", prm_batch_size=2))
    assert prm.text(PROBLEM, tuple(STEPS)) == f"{PROBLEM} Two plus two. ки\nIt is \\boxed{{4}}. ки"
    # a tag inside a step is not a step
    assert prm.text(PROBLEM, ("a ки b",)).count("ки") == 1

    scores = prm.score([PROBLEM], [[COMPLETION, LONGER]])[0]
    assert [len(s) for s in scores] == [2, 3]

    # the model card's forward, one sequence at a time
    model, tok = _causal_lm(shepherd_dir)
    candidates = tok.encode("+ -", add_special_tokens=False)
    tag_id = tok.encode("ки", add_special_tokens=False)[-1]
    ids = torch.tensor([tok.encode(f"{PROBLEM} Two plus two. ки\nIt is \\boxed{{4}}. ки")])
    with torch.inference_mode():
        probs = model(ids).logits[:, :, candidates].softmax(dim=-1)[:, :, 0]
    expected = probs[ids == tag_id].tolist()
    assert len(expected) == 2
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_skywork_value_head_at_step_ends(skywork_dir):
    import torch
    from safetensors.torch import load_file

    from ttc_mlops.prm.skywork import SkyworkPRM

    prm = SkyworkPRM(_recipe(skywork_dir, "skywork", prm_batch_size=4))
    ids, positions = prm.encode(PROBLEM, tuple(STEPS))
    newline = prm.tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert [ids[p] for p in positions] == [newline, newline] and positions[-1] == len(ids) - 1

    scores = prm.score([PROBLEM, PROBLEM], [[COMPLETION], [LONGER, COMPLETION]])
    assert [len(s) for s in scores[0] + scores[1]] == [2, 3, 2]
    assert scores[0][0] == scores[1][1]

    # Skywork's prepare_input (step_token "\n") and their value head: sigmoid(v_head(last hidden state))
    model, tok = _causal_lm(skywork_dir)
    step_id = tok.encode("\n")[-1]
    input_ids = tok.encode(tok.bos_token + PROBLEM + "\n")
    flags = [0] * len(input_ids)
    for step in "\n".join(STEPS).split("\n"):
        step_ids = tok.encode(step) + [step_id]
        input_ids += step_ids
        flags += [0] * (len(step_ids) - 1) + [1]
    head = load_file(skywork_dir / "model.safetensors")
    with torch.inference_mode():
        hidden = model(torch.tensor([input_ids]), output_hidden_states=True).hidden_states[-1][0]
        rewards = (hidden @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]).squeeze(-1).sigmoid()
    assert ids == input_ids
    assert scores[0][0] == pytest.approx([float(rewards[i]) for i, f in enumerate(flags) if f], abs=1e-5)


def test_qwen_math_prm_classifies_at_extra_0(qwen_prm_dir):
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from ttc_mlops.prm.qwen_prm import SYSTEM, QwenMathPRM

    prm = QwenMathPRM(_recipe(qwen_prm_dir, "qwen_math_prm", prm_batch_size=3))
    assert prm.text(PROBLEM, ("a<extra_0>b",)).count("<extra_0>") == 1
    scores = prm.score([PROBLEM], [[LONGER, COMPLETION]])[0]
    assert [len(s) for s in scores] == [3, 2]

    # the model card: chat with their system prompt, steps joined by <extra_0>, softmax(logits)[1] there
    model, tok = _causal_lm(qwen_prm_dir)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROBLEM},
                {"role": "assistant", "content": "<extra_0>".join(STEPS) + "<extra_0>"}]
    conversation = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert conversation == prm.text(PROBLEM, tuple(STEPS))
    input_ids = tok.encode(conversation, return_tensors="pt")
    w = load_file(qwen_prm_dir / "model.safetensors")
    with torch.inference_mode():
        hidden = model(input_ids, output_hidden_states=True).hidden_states[-1]
        logits = F.relu(hidden @ w["score.0.weight"].T + w["score.0.bias"]) @ w["score.2.weight"].T + w["score.2.bias"]
    mask = input_ids == tok.encode("<extra_0>")[0]
    probs = F.softmax(logits, dim=-1) * mask.unsqueeze(-1)
    expected = probs[0][probs[0] != 0].view(-1, 2)[:, 1].tolist()
    assert len(expected) == 2
    assert scores[1] == pytest.approx(expected, abs=1e-5)


def test_scores_ignore_batching_and_are_cached(skywork_dir):
    from ttc_mlops.prm.skywork import SkyworkPRM

    comps = [[COMPLETION, LONGER, "\\boxed{5}"]]
    one = SkyworkPRM(_recipe(skywork_dir, "skywork", prm_batch_size=1)).score([PROBLEM], comps)
    prm = SkyworkPRM(_recipe(skywork_dir, "skywork", prm_batch_size=3))
    together = prm.score([PROBLEM], comps)
    for a, b in zip(one[0], together[0]):
        assert a == pytest.approx(b, abs=1e-5)
    before = prm.tokens_processed
    assert prm.score([PROBLEM], comps) == together
    assert prm.tokens_processed == before


@pytest.fixture(scope="module")
def shepherd_llama_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """Math-Shepherd's published checkpoint is a LlamaForCausalLM: full attention, so prefixes are reused."""
    return _checkpoint(tmp_path_factory, "math-shepherd-llama", _tokenizer(smollm2_tokenizer_dir, "ки"), "Llama", 4)


@pytest.mark.parametrize("family, fixture", [("math_shepherd", "shepherd_llama_dir"), ("skywork", "skywork_dir"),
                                             ("qwen_math_prm", "qwen_prm_dir")])
def test_a_grown_beam_runs_only_its_new_step_and_no_score_changes(family, fixture, request):
    from ttc_mlops.prm.families import prm_class

    path = request.getfixturevalue(fixture)
    make = lambda gib: prm_class(str(path), family)(_recipe(path, family, prm_batch_size=2,  # noqa: E731
                                                           prefix_cache_gib=gib))
    reuse, plain = make(1.0), make(0.0)
    assert reuse.store is not None
    problem = "A long enough problem statement: what is the sum of the first ten positive integers?"
    steps = ["Pair them up: 1+10, 2+9 and so on.\n\n", "Five pairs of 11.\n\n", "So the sum is \\boxed{55}.\n\n"]
    siblings = ["Or use n(n+1)/2.\n\n", "Add them one by one.\n\n"]
    for k in range(1, 4):  # three iterations: the beam grows by a step, its siblings are new
        comps = ["".join(steps[:k])] + ["".join(steps[: k - 1]) + s for s in siblings]
        spent, full = reuse.tokens_processed, plain.tokens_processed
        plain.clear_cache()  # plain runs every sequence whole
        got, want = reuse.score([problem], [comps])[0], plain.score([problem], [comps])[0]
        for a, b in zip(got, want):
            assert a == pytest.approx(b, abs=1e-5)
        if k > 1:
            assert reuse.tokens_processed - spent < (plain.tokens_processed - full) / 2
    assert reuse.store.hit_tokens > reuse.store.miss_tokens


def test_a_sliding_window_model_runs_sequences_whole_and_still_caches_scores(shepherd_dir):
    from ttc_mlops.prm.math_shepherd import MathShepherdPRM

    prm = MathShepherdPRM(_recipe(shepherd_dir, "math_shepherd"))  # Mistral's config: a 4096-token window
    assert prm.store is None
    first = prm.score([PROBLEM], [[STEPS[0] + "\n\n"]])[0][0]
    spent = prm.tokens_processed
    grown = prm.score([PROBLEM], [[COMPLETION]])[0][0]
    assert grown[0] == first[0]  # the first step's score came from the cache
    assert prm.tokens_processed - spent == len(prm.encode(PROBLEM, tuple(STEPS))[0])  # the sequence ran whole


def test_a_wrong_family_names_the_missing_head(tiny_llama_dir):
    from ttc_mlops.prm.skywork import SkyworkPRM

    with pytest.raises(RuntimeError, match=r"holds no v_head\.summary\.\* weights"):
        SkyworkPRM(_recipe(tiny_llama_dir, "skywork"))


def test_a_split_step_marker_is_an_error(smollm2_tokenizer_dir, qwen_prm_dir, tmp_path):
    import shutil

    from ttc_mlops.prm.qwen_prm import QwenMathPRM

    # the same checkpoint with a tokenizer that has no <extra_0> token
    shutil.copytree(qwen_prm_dir, tmp_path, dirs_exist_ok=True)
    _tokenizer(smollm2_tokenizer_dir).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="splits '<extra_0>'"):
        QwenMathPRM(_recipe(tmp_path, "qwen_math_prm"))


@pytest.mark.parametrize("prm_path, family", [
    ("peiyi9979/math-shepherd-mistral-7b-prm", "math_shepherd"),
    ("Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B", "skywork"),
    ("Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B", "skywork"),
    ("Qwen/Qwen2.5-Math-PRM-7B", "qwen_math_prm"),
    ("RLHFlow/Llama3.1-8B-PRM-Mistral-Data", "rlhflow"),
])
def test_registry_maps_published_ids(prm_path, family):
    from ttc_mlops.prm.families import family_for, prm_class

    assert family_for(prm_path) == family
    assert prm_class(prm_path).__module__.endswith(family.replace("qwen_math_prm", "qwen_prm"))


def test_unknown_prm_needs_an_explicit_family():
    from ttc_mlops.prm.families import family_for

    with pytest.raises(RecipeError, match=r"prm_path='me/my-finetuned-prm' is not a known PRM.*set prm_family"):
        family_for("me/my-finetuned-prm")
    assert family_for("me/my-finetuned-prm", "skywork") == "skywork"
    with pytest.raises(RecipeError, match="prm_family='shepherd'"):
        family_for("me/my-finetuned-prm", "shepherd")
