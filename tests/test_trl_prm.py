"""TRL-trained PRMs (prm_family: trl) for real: a tiny token-classification model trained with TRL's
PRMTrainer on CPU for a few seconds, saved by the trainer, and scored by the family, through `ttc run`
too, against a plain forward pass of the saved model on TRL's own tokenization. Also: what the other
families say when handed a checkpoint that lacks what they read.

    python -m pytest -q tests/test_trl_prm.py
"""

import functools
import logging
import shutil

import pytest

from ttc_mlops.config import Recipe, RecipeError, build_recipe

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'",
                                        "ignore:`gradient_checkpointing` is deprecated")

SEPARATOR = " ки"  # not TRL's default "\n", and several tokens here: the family must read it from the checkpoint
PAIRS = [(2, 3), (4, 1), (3, 3), (5, 2), (1, 6), (2, 2)]


def _rows():
    """Stepwise supervision as TRL takes it: a right and a wrong solution per problem, labelled per step."""
    rows = []
    for a, b in PAIRS:
        rows.append({"prompt": f"What is {a}+{b}?", "labels": [True, True, True],
                     "completions": [f"We add {a} and {b}.", f"{a} plus {b} is {a + b}.", f"So the answer is {a + b}."]})
        rows.append({"prompt": f"What is {a}+{b}?", "labels": [True, False, False],
                     "completions": [f"We add {a} and {b}.", f"{a} minus {b} is {a + b}.", f"So the answer is not {a + b}."]})
    return rows


@pytest.fixture(scope="module")
def trl_prm(smollm2_tokenizer_dir, tmp_path_factory):
    """(untrained, trained) directories: a tiny random Qwen2 token classifier (2 labels) with SmolLM2's
    tokenizer, saved as initialised and after 30 seeded PRMTrainer steps (trainer.save_model)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForTokenClassification, AutoTokenizer, Qwen2Config
    from trl.experimental.prm import PRMConfig, PRMTrainer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, num_labels=2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForTokenClassification.from_config(config)
    untrained = tmp_path_factory.mktemp("trl-prm-untrained")
    model.save_pretrained(untrained)
    tok.save_pretrained(untrained)

    trained = tmp_path_factory.mktemp("trl-prm")
    args = PRMConfig(output_dir=str(trained), step_separator=SEPARATOR, max_steps=30, learning_rate=2e-2,
                     per_device_train_batch_size=len(_rows()), bf16=False, gradient_checkpointing=False,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=10, seed=0)
    trainer = PRMTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows()), processing_class=tok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains ~30x faster on one thread than on two busy cores
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    trainer.save_model(str(trained))
    return untrained, trained


def _settings(path, **kw):
    return Recipe(prm_path=str(path), prm_family="trl", dtype="float32", device="cpu", **kw).prm_settings


@functools.cache
def _saved(path):
    """The saved model as transformers loads it, and its tokenizer."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    return AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _reference(path, problem, steps):
    """The saved model's own forward on PRMTrainer.tokenize_row's input: P(label 1) where TRL puts the labels."""
    import torch
    from trl.experimental.prm import PRMTrainer

    model, tok = _saved(path)
    row = PRMTrainer.tokenize_row({"prompt": problem, "completions": list(steps), "labels": [True] * len(steps)},
                                  tok, SEPARATOR, max_length=None, max_completion_length=None,
                                  train_on_last_step_only=False, is_eval=False)
    with torch.inference_mode():
        probs = model(torch.tensor([row["input_ids"]])).logits.softmax(dim=-1)[0, :, 1]
    return [float(probs[t]) for t, label in enumerate(row["labels"]) if label != -100], row["input_ids"]


@pytest.mark.slow  # the trl_prm fixture trains with TRL
def test_ttc_run_beam_search_with_a_trl_prm_scores_as_the_saved_model(trl_prm, tiny_llama_dir, mlflow_store, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from ttc_mlops import names
    from ttc_mlops.cli import app
    from ttc_mlops.pipeline import store
    from ttc_mlops.prm import split_steps

    _, trained = trl_prm
    recipe = tmp_path / "beam.yaml"
    recipe.write_text(yaml.safe_dump({
        "approach": "beam_search", "model_path": str(tiny_llama_dir), "dataset_name": "builtin:math-mini",
        "num_samples": 2, "n": 4, "beam_width": 2, "num_iterations": 2, "max_tokens": 8, "temperature": 1.0,
        "device": "cpu", "dtype": "float32", "experiment_name": "trl-prm"}))
    out = CliRunner().invoke(app, ["run", str(recipe), "--no-progress", "--set", f"prm_path={trained}",
                                   "--set", "prm_family=trl"])
    assert out.exit_code == 0, out.output

    c = store.client()
    runs = c.search_runs([c.get_experiment_by_name("trl-prm").experiment_id])
    chunk = next(r for r in runs if r.data.tags.get(names.TAG_ROLE) == "chunk")
    records = store.load_records(chunk.info.run_id, names.chunk_artifact(0, 2))
    assert len(records) == 2 and all(r.completions for r in records)
    for record in records:
        for completion, scores in zip(record.completions, record.step_scores):
            steps = [s.strip() for s in split_steps(completion)]
            expected, _ = _reference(trained, record.problem, steps)
            assert scores == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow  # the trl_prm fixture trains with TRL
def test_scores_are_the_models_at_trl_separators_and_a_grown_solution_runs_only_its_new_step(trl_prm):
    from ttc_mlops.prm.families import prm_class

    _, trained = trl_prm
    prm = prm_class(str(trained), "trl")(_settings(trained, prm_batch_size=2))
    assert prm.separator == SEPARATOR  # read from the trainer's training_args.bin
    problem = "What is 2+3? Give the sum of the two numbers, and say why the sum is right."
    steps = ["We add 2 and 3.", "2 plus 3 is 5.\nThat is one more than 4.", "So the answer is 5."]
    for k in range(1, 4):
        spent = prm.tokens_processed
        partial = "\n\n".join(steps[:k]) + "\n\n"
        [[got, other]] = prm.score([problem], [[partial, "\n\n".join(steps[: k - 1] + ["2 minus 3 is 5."])]])
        expected, ids = _reference(trained, problem, steps[:k])
        assert got == pytest.approx(expected, abs=1e-5)
        assert other[-1] == pytest.approx(_reference(trained, problem, steps[: k - 1] + ["2 minus 3 is 5."])[0][-1],
                                          abs=1e-5)
        if k > 1:  # the statement and the earlier steps came from the prefix store
            assert prm.tokens_processed - spent < len(ids)
    encoded, positions = prm.encode(problem, tuple(steps))
    assert encoded == _reference(trained, problem, steps)[1]
    assert [encoded[p] for p in positions] == [prm.sep_ids[-1]] * 3 and len(prm.sep_ids) > 1


@pytest.mark.slow  # the trl_prm fixture trains with TRL
def test_training_moves_scores_toward_the_labels(trl_prm):
    from ttc_mlops.prm.trl import TRLPRM

    untrained, trained = trl_prm
    before = TRLPRM(_settings(untrained, prm_step_separator=SEPARATOR))
    after = TRLPRM(_settings(trained))

    def by_label(prm):
        rows = _rows()
        scored = prm.score([r["prompt"] for r in rows], [["\n\n".join(r["completions"])] for r in rows])
        good, bad = [], []
        for row, [scores] in zip(rows, scored):
            for score, label in zip(scores, row["labels"]):
                (good if label else bad).append(score)
        return good, bad

    def mean(xs):
        return sum(xs) / len(xs)

    (good0, bad0), (good1, bad1) = by_label(before), by_label(after)
    assert mean(good1) > mean(good0) and mean(bad1) < mean(bad0)
    assert min(good1) > 0.9 and max(bad1) < 0.1  # every right step above every wrong one, by far


@pytest.mark.slow  # the trl_prm fixture trains with TRL
def test_the_separator_is_the_recipes_then_the_checkpoints_then_trls_default(trl_prm, tmp_path, caplog):
    from ttc_mlops.prm.trl import DEFAULT_SEPARATOR, TRLPRM

    untrained, trained = trl_prm
    with caplog.at_level(logging.WARNING, logger="ttc_mlops.prm.trl"):
        overridden = TRLPRM(_settings(trained, prm_step_separator="\n"))
    assert overridden.separator == "\n" and "trained with ' ки'" in caplog.text
    assert overridden.encode("1+1?", ("2",))[0][-1] == overridden.tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert TRLPRM(_settings(untrained)).separator == DEFAULT_SEPARATOR == "\n"  # no training_args.bin

    # a training_args.bin that is not a torch archive: unread, with a warning, never executed
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / "training_args.bin").write_bytes(b"\x80\x04not a zip")
    with caplog.at_level(logging.WARNING, logger="ttc_mlops.prm.trl"):
        assert TRLPRM(_settings(copy)).separator == "\n"
    assert "could not be read" in caplog.text


def test_the_recipe_field_carries_the_separator_and_rejects_an_empty_one():
    r = build_recipe({}, ["prm_family=trl", "prm_path=./my-prm", "prm_step_separator=<step>"])
    assert r.prm_settings.step_separator == "<step>" and r.prm_settings.family == "trl"
    assert Recipe().prm_settings.step_separator is None
    with pytest.raises(RecipeError, match="prm_step_separator=''"):
        build_recipe({}, ["prm_step_separator="])


def _without(src, dst, *names):
    """A copy of checkpoint `src` whose weights lack `names`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    for name in names:
        del state[name]
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.slow  # the trl_prm fixture trains with TRL
def test_a_checkpoint_without_what_a_family_reads_is_an_error_naming_it(trl_prm, tiny_llama_dir, tmp_path):
    from ttc_mlops.prm.families import prm_class

    _, trained = trl_prm

    def build(path, family):
        return prm_class(str(path), family)(Recipe(prm_path=str(path), prm_family=family, dtype="float32",
                                                   device="cpu").prm_settings)

    # a causal LM is not a token classifier: its score layer would be random
    with pytest.raises(RuntimeError, match=r"holds no score\.bias, score\.weight of the LlamaForTokenClassification"):
        build(tiny_llama_dir, "trl")
    with pytest.raises(RuntimeError, match=r"holds no model\.norm\.weight"):
        build(_without(trained, tmp_path / "no-norm", "model.norm.weight"), "trl")
    # a token classifier has no LM head: the +/- families must not read a random one
    for family in ("rlhflow", "math_shepherd"):
        with pytest.raises(RuntimeError, match=r"holds no lm_head\.weight"):
            build(trained, family)
    with pytest.raises(RuntimeError, match=r"holds no v_head\.summary\.\* weights"):
        build(trained, "skywork")
    with pytest.raises(RuntimeError, match=r"score head shapes"):
        build(trained, "qwen_math_prm")
    # the value / classification head families load the base model checked too
    with pytest.raises(RuntimeError, match=r"holds no norm\.weight"):
        build(tmp_path / "no-norm", "skywork")
