"""What every PRM family here shares: one sequence per (problem, steps), each step's score read from
the final hidden state at one position of it; scores cached per step prefix; the forward pass run
by a backend.

    python -m pytest -q tests/test_prm_families.py tests/test_kvcache.py

A family says what is scored: how a (problem, steps) pair becomes token ids plus, per step, the
position whose hidden state carries the step's score (`encode`), and how those hidden states become
scores in [0, 1] (`step_scores`, the family's head). A backend says where the forward pass runs
(`ForwardPass`): `TransformersForward` (prm/forward.py: this project's prefix store, batched by
`prm_batch_size`), `VLLMForward` (prm/vllm.py: vLLM's pooling runner in this process, its own
automatic prefix caching) or `RemoteForward` (prm/remote.py: the same on a vLLM server,
`prm_base_url`). Each hands back the final hidden states at the read positions of the
steps not scored yet; the family's head turns them into scores.

A step's score depends only on the tokens up to its position, so scores are cached per step prefix,
whatever the backend: a completion scored before, or named twice in a call, costs nothing, and a
beam that grew by one step needs one new score. The score cache lives as long as its problem is
being scored: a call that does not name a problem drops that problem's entries.

A family opts in to the vLLM backend by setting `vllm = True` and building its head from the
checkpoint's tensors when `settings.backend == "vllm"` (no transformers model is loaded then); a
family that does not is refused on vLLM with an error naming it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from ..config import PRMSettings
from . import split_steps

log = logging.getLogger(__name__)


@dataclass
class Row:
    """A sequence to run: its ids, the position read for each step's score, the first step without one."""

    key: tuple[str, tuple[str, ...]]
    ids: list[int]
    read_at: list[int]
    first_new: int

    @property
    def reuse_limit(self) -> int:
        return self.read_at[self.first_new]  # the first unscored step's position must run

    @property
    def wanted(self) -> list[int]:
        """The positions whose hidden states score the steps not scored yet."""
        return self.read_at[self.first_new:]


class ForwardPass(Protocol):
    """Where a PRM's forward pass runs (a backend): final hidden states at the rows' wanted positions."""

    params: int | None  # parameters one token's forward multiplies by; None: unknown
    tokens_processed: int  # input tokens run through the model (reuse spares the rest)
    device: object  # where the hidden states it returns live (the family's head goes there)
    head_dtype: object  # their dtype
    hidden_size: int

    def clear_cache(self) -> None:
        """Forget every prefix kept between calls."""

    def run(self, rows: list[Row]) -> Iterator[tuple[Row, object]]:
        """Per row, a [len(row.wanted), hidden size] tensor: the final hidden states there."""


class StepwisePRM(ABC):
    name: str
    vllm: bool = False  # whether the family can score on the vLLM backend (see the module docstring)

    def __init__(self, settings: PRMSettings, base, tokenizer, device=None):
        """`base`: the model without its output layer, whose last hidden states `step_scores` reads
        (run by the transformers backend), or a `ForwardPass` of another backend."""
        from .forward import TransformersForward

        self.name = settings.path
        self.tokenizer = tokenizer
        if isinstance(base, ForwardPassBase):
            self.forward, self.base = base, None
        else:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
            self.forward, self.base = TransformersForward(base, settings, pad_id, f"PRM {self.name}"), base
        self.device = self.forward.device if device is None else device
        self.batch_size = settings.batch_size
        self._scores: dict[tuple[str, tuple[str, ...]], float] = {}  # (problem, steps 1..j) -> step j's score
        self.tokens_full = 0  # every token of every sequence asked for, as if nothing were reused
        self._lengths: dict[tuple[str, tuple[str, ...]], int] = {}  # (problem, steps) -> its sequence's tokens
        self._recent: dict[str, None] = {}  # problems by when they were last scored, oldest first
        self.params = self.forward.params

    # --- what a family defines
    @abstractmethod
    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        """Token ids of the PRM input and, per step, the position whose hidden state scores it."""

    @abstractmethod
    def step_scores(self, hidden):
        """[k] scores in [0, 1] from [k, hidden size] final hidden states."""

    # --- what the backend counts
    @property
    def tokens_processed(self) -> int:  # PRM input tokens run through the model
        return self.forward.tokens_processed

    @property
    def store(self):  # the transformers backend's prefix store (None elsewhere)
        return getattr(self.forward, "store", None)

    @property
    def attended(self) -> int:  # query x key positions the batched passes attended (transformers)
        return getattr(self.forward, "attended", 0)

    @property
    def attended_alone(self) -> int:  # what the same rows attend run one by one (no padding)
        return getattr(self.forward, "attended_alone", 0)

    # --- shared
    def clear_cache(self) -> None:
        self._scores.clear()
        self._lengths.clear()
        self._recent.clear()
        self.forward.clear_cache()

    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[list[float]]]:
        self._forget_old(problems)
        keys = [[(problem, tuple(split_steps(c))) for c in comps] for problem, comps in zip(problems, completions)]
        todo = [self._row(key) for key in dict.fromkeys(key for row in keys for key in row) if key not in self._scores]
        if todo:
            self._run(todo)
        self.tokens_full += sum(self._length(key) for row in keys for key in row)
        return [[[self._scores[(p, steps[:j])] for j in range(1, len(steps) + 1)] for p, steps in row] for row in keys]

    def _forget_old(self, problems: list[str]) -> None:
        """Keep the scores of the RECENT_PROBLEMS problems scored last: a step-level search fed
        continuously scores one problem at a time, and each comes back next iteration for its new
        steps only; a problem not seen for that long is done."""
        for problem in problems:
            self._recent.pop(problem, None)
            self._recent[problem] = None
        if len(self._recent) > RECENT_PROBLEMS:
            old = set(list(self._recent)[: len(self._recent) - RECENT_PROBLEMS])
            for problem in old:
                del self._recent[problem]
            self._scores = {k: v for k, v in self._scores.items() if k[0] not in old}
            self._lengths = {k: v for k, v in self._lengths.items() if k[0] not in old}

    def _check_positions(self, positions: list[int], steps: tuple[str, ...], marker: str) -> list[int]:
        if len(positions) != len(steps):
            raise RuntimeError(f"PRM {self.name}: {len(steps)} steps but {len(positions)} {marker!r} tokens in its "
                               f"input; the tokenizer does not keep {marker!r} as one token")
        return positions

    def _length(self, key: tuple[str, tuple[str, ...]]) -> int:
        """Tokens of the sequence that scores `key`'s last step (what a PRM without reuse runs)."""
        if key not in self._lengths:
            _, read_at = self.encode(*key)
            self._lengths[key] = read_at[-1] + 1
        return self._lengths[key]

    def _row(self, key: tuple[str, tuple[str, ...]]) -> Row:
        problem, steps = key
        ids, read_at = self.encode(problem, steps)
        self._lengths[key] = read_at[-1] + 1
        first_new = next(j for j in range(len(steps)) if (problem, steps[: j + 1]) not in self._scores)
        return Row(key, ids[: read_at[-1] + 1], read_at, first_new)

    def _run(self, rows: list[Row]) -> None:
        import torch

        with torch.inference_mode():
            for row, hidden in self.forward.run(rows):
                (problem, steps), j0 = row.key, row.first_new
                for j, p in enumerate(self.step_scores(hidden).float().tolist(), start=j0):
                    self._scores[(problem, steps[: j + 1])] = p


class ForwardPassBase:
    """What a backend's forward pass subclasses, so that `StepwisePRM` tells it from a bare model."""


RECENT_PROBLEMS = 1024  # problems whose step scores are kept (a few KB each)
PADDED_ATTENTION = 1.5  # a transformers PRM batch's attention over padding, at most this times the rows' own


def pair_probability(model, hidden, good_id: int, bad_id: int):
    """P(good) / (P(good) + P(bad)) of the next token, from a causal LM's final hidden states: two
    rows of its output layer, not the whole vocabulary."""
    import torch

    head = model.get_output_embeddings()
    weight = head.weight[[good_id, bad_id]]
    bias = head.bias[[good_id, bad_id]] if getattr(head, "bias", None) is not None else None
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits.softmax(-1)[:, 0]


def load_base(settings: PRMSettings):
    """(what `StepwisePRM.__init__` runs, tokenizer): on the transformers backend the base model
    without its LM head, on vLLM the engine's forward pass (no transformers model is loaded)."""
    if settings.backend == "vllm":
        return vllm_forward(settings), load_tokenizer(settings)
    base, tokenizer, _ = load_base_model(settings)
    return base, tokenizer


def load_causal(settings: PRMSettings):
    """(what `StepwisePRM.__init__` runs, tokenizer, the causal LM or None on vLLM) for the families
    that read a causal LM's next-token probabilities."""
    from ..models import load_causal_lm

    if settings.backend == "vllm":
        return vllm_forward(settings), load_tokenizer(settings), None
    model, tokenizer, _ = load_causal_lm(settings)
    require_output_head(settings.path, model)
    return model.base_model, tokenizer, model


def vllm_forward(settings: PRMSettings) -> ForwardPass:
    """The vLLM backend's forward pass: a vLLM server's where `prm_base_url` names one
    (prm/remote.py), else this process's engine (prm/vllm.py)."""
    if settings.base_url:
        from .remote import RemoteForward

        return RemoteForward(settings)
    from .vllm import VLLMForward

    return VLLMForward(settings)


def load_tokenizer(settings: PRMSettings):
    import transformers

    from ..models import resolve_model

    return transformers.AutoTokenizer.from_pretrained(resolve_model(settings.path))


class PairHead:
    """P(good) / (P(good) + P(bad)) of the next token from final hidden states: two rows of a causal
    LM's output layer, taken from the loaded model or, on vLLM, read from the checkpoint."""

    def __init__(self, prm_path: str, model, good_id: int, bad_id: int):
        self.model, self.good_id, self.bad_id = model, good_id, bad_id
        if model is None:
            self.weight, self.bias, self.cap = output_rows(prm_path, [good_id, bad_id])

    def __call__(self, hidden):
        import torch

        if self.model is not None:
            return pair_probability(self.model, hidden, self.good_id, self.bad_id)
        logits = torch.nn.functional.linear(hidden.float(), self.weight, self.bias)
        if self.cap:
            logits = self.cap * torch.tanh(logits / self.cap)
        return logits.softmax(-1)[:, 0]


def output_rows(prm_path: str, ids: list[int]):
    """(weight [len(ids), hidden], bias or None, final_logit_softcapping or None), float32, of the
    checkpoint's output layer (its input embeddings where the two are tied), read without loading the
    model. A checkpoint with neither is an error."""
    import torch
    import transformers

    from ..models import resolve_model

    config = transformers.AutoConfig.from_pretrained(resolve_model(prm_path))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = checkpoint_tensor_names(prm_path)
    if "lm_head.weight" in names:
        weight_name = "lm_head.weight"
    else:
        tied = [n for n in sorted(names) if n.endswith("embed_tokens.weight")]
        if not getattr(text, "tie_word_embeddings", False) or not tied:
            raise RuntimeError(f"prm_path={prm_path!r}: the checkpoint holds no lm_head.weight (the output layer this "
                               f"family reads its good / bad token probabilities from); is prm_family right for "
                               f"this model?")
        weight_name = tied[0]
    rows = _read_rows(prm_path, weight_name, ids)
    bias = _read_rows(prm_path, "lm_head.bias", ids) if "lm_head.bias" in names else None
    cap = getattr(text, "final_logit_softcapping", None)
    return rows.to(torch.float32), None if bias is None else bias.to(torch.float32), cap


def _read_rows(prm_path: str, name: str, ids: list[int]):
    """Rows `ids` of one checkpoint tensor, read from its file without loading the rest."""
    import json

    import torch
    from transformers.utils import cached_file

    source, file_name, path = _weight_file(prm_path)
    if file_name.endswith(".index.json"):
        path = cached_file(source, json.loads(Path(path).read_text())["weight_map"][name])
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            piece = f.get_slice(name)
            return torch.cat([piece[i : i + 1] for i in ids])
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[name][ids]


def load_base_model(settings: PRMSettings):
    """(base model without its LM head, tokenizer, device): the hidden states a value or
    classification head reads. Heads are loaded by `load_head`, never by remote code."""
    # The checkpoints name their own head classes in `auto_map`; the base is plain transformers code.
    return load_checked(settings, "AutoModel")


def load_checked(settings: PRMSettings, auto_class: str):
    """(model, tokenizer, device) of a transformers Auto class, without remote code. A weight the
    checkpoint lacks is an error naming it: transformers only warns and initialises it at random."""
    import transformers

    from ..models import pack_linears, pick_device, pick_dtype, resolve_model

    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    source = resolve_model(settings.path)
    log.info("loading PRM %s (%s, %s, %s)", settings.path, auto_class, dtype, device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model, info = getattr(transformers, auto_class).from_pretrained(source, dtype=dtype, trust_remote_code=False,
                                                                    output_loading_info=True)
    missing = sorted(info["missing_keys"])  # (a weight of the wrong shape is transformers' own error)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise RuntimeError(f"prm_path={settings.path!r}: the checkpoint holds no {', '.join(missing[:3])}{more} of the "
                           f"{type(model).__name__} it is loaded as; is prm_family right for this model?")
    model.to(device).eval()
    pack_linears(model)
    return model, tokenizer, device


def require_output_head(prm_path: str, model) -> None:
    """A causal LM's output layer must come from the checkpoint (or be its tied input embeddings):
    transformers fills a missing one at random and only warns, and every score would be noise."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        raise RuntimeError(f"prm_path={prm_path!r}: {type(model).__name__} has no output layer to read tokens from")
    if embeddings is not None and head.weight is embeddings.weight:
        return  # tied: loaded with the base model
    name = next(n for n, p in model.named_parameters() if p is head.weight)
    if name not in checkpoint_tensor_names(prm_path):
        raise RuntimeError(f"prm_path={prm_path!r}: the checkpoint holds no {name} (the output layer this family reads "
                           f"its good / bad token probabilities from); is prm_family right for this model?")


_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def _weight_file(prm_path: str) -> tuple[str, str, str]:
    """(source, name, local path) of the first of _WEIGHT_FILES the checkpoint has."""
    from transformers.utils import cached_file

    from ..models import resolve_model

    source = resolve_model(prm_path)
    for name in _WEIGHT_FILES:
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            return source, name, path
    raise RuntimeError(f"prm_path={prm_path!r}: none of {_WEIGHT_FILES} found in {source}")


def load_head(prm_path: str, prefix: str) -> dict:
    """The checkpoint tensors whose names start with `prefix` (e.g. "v_head."), prefix removed."""
    import json

    from transformers.utils import cached_file

    source, name, path = _weight_file(prm_path)
    if name.endswith(".index.json"):
        weight_map = json.loads(Path(path).read_text())["weight_map"]
        paths = [cached_file(source, f) for f in sorted({f for key, f in weight_map.items() if key.startswith(prefix)})]
    else:
        paths = [path]
    tensors = {}
    for p in paths:
        tensors.update(_read_tensors(p, prefix))
    if not tensors:
        raise RuntimeError(f"prm_path={prm_path!r}: the checkpoint ({name}) holds no {prefix}* weights; "
                           f"is prm_family right for this model?")
    return {key[len(prefix):]: value for key, value in tensors.items()}


def checkpoint_tensor_names(prm_path: str) -> set[str]:
    """The names of the tensors a checkpoint holds, from its index or its weight file's header."""
    import json

    _, name, path = _weight_file(prm_path)
    if name.endswith(".index.json"):
        return set(json.loads(Path(path).read_text())["weight_map"])
    if name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    import torch

    return set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def _read_tensors(path: str, prefix: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value for key, value in state.items() if key.startswith(prefix)}
