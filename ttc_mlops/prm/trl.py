"""PRMs trained with TRL's `PRMTrainer`: token classification at the step separator.

    ttc run recipes/Llama-3.2-1B-Instruct/beam_search.yaml --set prm_path=./my-prm --set prm_family=trl

TRL's PRMTrainer (trl.experimental.prm, TRL 1.0 to 1.13) fine-tunes an
`AutoModelForTokenClassification` with two labels (0: the step is wrong, 1: it is right) on
stepwise supervision: a prompt, its steps, one label per step. Its `tokenize_row` builds the input
from pieces tokenized one by one without special tokens: BOS (where the tokenizer has one), the
prompt as it is, then every step followed by the separator (`PRMConfig.step_separator`, default
"\\n"); a step's label sits on the last token of the separator after it. This family builds the
same input from this project's steps (blank-line split, surrounding whitespace stripped) and
scores a step as softmax(logits)[1] there.

The separator is the recipe's `prm_step_separator` if set, else the one the model was trained
with: the trainer's `save_model` writes its PRMConfig beside the weights as `training_args.bin`
(a pickle; read here without running anything from it), else TRL's default "\\n".

The model is transformers' own (no remote code): its base model runs under `StepwisePRM` (prefix
reuse, score cache) and its `score` layer is the head, which is the model's whole forward
(base -> dropout, off in eval -> score) for the causal LMs transformers gives a token-classification
class (Llama, Qwen2/3, Mistral, Gemma, Phi-3, ...). On vLLM (`prm_backend: vllm`) the base runs as
its causal LM there and the `score` layer is read from the checkpoint.
"""

from __future__ import annotations

import logging
import pickle
import zipfile

from .stepwise import StepwisePRM, load_checked

log = logging.getLogger(__name__)

DEFAULT_SEPARATOR = "\n"  # PRMConfig.step_separator's default
TRAINING_ARGS = "training_args.bin"  # where transformers' Trainer.save_model pickles its config


class TRLPRM(StepwisePRM):
    vllm = True  # vLLM runs the causal LM base; the `score` layer is read from the checkpoint

    def __init__(self, settings):
        from ..models import resolve_model

        if settings.backend == "vllm":
            import torch
            import transformers

            from .stepwise import load_head, load_tokenizer, vllm_forward

            config = transformers.AutoConfig.from_pretrained(resolve_model(settings.path))
            _check_token_classifier(settings.path, (config.architectures or ["?"])[0], config,
                                    any(a.endswith("ForTokenClassification") for a in config.architectures or []))
            super().__init__(settings, vllm_forward(settings), load_tokenizer(settings))
            weights = load_head(settings.path, "score.")
            self.head = torch.nn.Linear(self.forward.hidden_size, 2, bias="bias" in weights)
            self.head.load_state_dict(weights)
            self.head.eval()
        else:
            from transformers.modeling_layers import GenericForTokenClassification

            model, tokenizer, device = load_checked(settings, "AutoModelForTokenClassification")
            _check_token_classifier(settings.path, type(model).__name__, model.config,
                                    isinstance(model, GenericForTokenClassification))
            super().__init__(settings, model.base_model, tokenizer, device)
            self.head = model.score
        tokenizer = self.tokenizer

        trained = trained_separator(resolve_model(settings.path))
        if settings.step_separator is not None:
            self.separator = settings.step_separator
            if trained is not None and trained != self.separator:
                log.warning("PRM %s: prm_step_separator=%r, but the model was trained with %r (%s)", self.name,
                            self.separator, trained, TRAINING_ARGS)
        elif trained is not None:
            self.separator = trained
        else:
            self.separator = DEFAULT_SEPARATOR
            log.info("PRM %s: no %s beside the weights; step separator %r (TRL's default; prm_step_separator "
                     "sets another)", self.name, TRAINING_ARGS, self.separator)
        self.sep_ids = tokenizer.encode(self.separator, add_special_tokens=False)
        if not self.sep_ids:
            raise RuntimeError(f"PRM {self.name}: the step separator {self.separator!r} is no token at all")
        self.prefix_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids = self.prefix_ids + tok.encode(problem, add_special_tokens=False)
        positions = []
        for step in steps:
            ids += tok.encode(step.strip(), add_special_tokens=False) + self.sep_ids
            positions.append(len(ids) - 1)
        return ids, positions

    def step_scores(self, hidden):
        return self.head(hidden).float().softmax(dim=-1)[:, 1]


def _check_token_classifier(prm_path: str, name: str, config, token_classifier: bool) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # a step's score may depend only on the tokens before it (prefix reuse and the score cache rely on it)
    if not token_classifier or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise RuntimeError(f"prm_path={prm_path!r}: {name} is not a causal LM with a token-classification "
                           f"head (Llama, Qwen2/3, Mistral, Gemma, Phi-3, ...), which prm_family='trl' reads")
    if config.num_labels != 2:
        raise RuntimeError(f"prm_path={prm_path!r}: {name} has {config.num_labels} labels; TRL's "
                           f"PRMTrainer trains 2 (0: wrong step, 1: right step)")


def trained_separator(source: str) -> str | None:
    """`step_separator` of the PRMConfig pickled in `source`'s training_args.bin; None where there is none."""
    from transformers.utils import cached_file

    path = cached_file(source, TRAINING_ARGS, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return None
    try:
        with zipfile.ZipFile(path) as zf:  # torch.save's format: <name>/data.pkl inside a zip
            [member] = [m for m in zf.namelist() if m.endswith("/data.pkl")]
            config = _InertUnpickler(zf.open(member)).load()
    except (zipfile.BadZipFile, ValueError, pickle.UnpicklingError, EOFError) as err:
        log.warning("%s: %s could not be read (%s); its step separator is unknown", source, TRAINING_ARGS, err)
        return None
    state = getattr(config, "state", None)
    separator = state.get("step_separator") if isinstance(state, dict) else None
    return separator if isinstance(separator, str) and separator else None


class _Inert:
    """Stands in for every class a pickle names, so that reading it imports and runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state[0] if isinstance(state, tuple) else state


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return type(name, (_Inert,), {"__module__": module})

    def persistent_load(self, pid):
        return None  # a tensor's storage: not needed for a text field
