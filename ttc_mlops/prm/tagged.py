"""What the Math-Shepherd, Skywork-o1 and Qwen2.5-Math PRMs share: one sequence per completion,
one score read at each step's marked token.

    python -m pytest -q tests/test_prm_families.py

A family says how a (problem, steps) pair becomes token ids plus the positions that carry the step
scores (`encode`), and how a forward pass turns into a per-token probability (`token_scores`).
This base batches sequences by `prm_batch_size` (similar lengths together, padded on the right so
that positions stay those of the unpadded sequence) and caches scores by (problem, steps), so that
step-level search only pays for new steps.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

from . import split_steps

log = logging.getLogger(__name__)


class TaggedStepPRM(ABC):
    name: str

    def __init__(self, recipe, model, tokenizer, device):
        self.name = recipe.prm_path
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.batch_size = recipe.prm_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self._cache: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        self.tokens_processed = 0  # PRM input tokens run through the model

    # --- what a family defines
    @abstractmethod
    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        """Token ids of the PRM input and, per step, the position whose score is the step's."""

    @abstractmethod
    def token_scores(self, input_ids, attention_mask):
        """[batch, seq] scores in [0, 1] from one forward pass."""

    # --- shared
    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[list[float]]]:
        keys = [[(problem, tuple(split_steps(c))) for c in comps] for problem, comps in zip(problems, completions)]
        todo = list(dict.fromkeys(key for row in keys for key in row if key not in self._cache))
        if todo:
            encoded = {key: self.encode(*key) for key in todo}
            todo.sort(key=lambda key: len(encoded[key][0]))  # similar lengths share a batch: less padding
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start : start + self.batch_size]
                for key, scores in zip(batch, self._score_batch([encoded[k] for k in batch])):
                    self._cache[key] = scores
        return [[list(self._cache[key]) for key in row] for row in keys]

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        import torch

        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [self.pad_id] * (width - len(ids)) for ids, _ in batch], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=self.device)
        self.tokens_processed += int(mask.sum())
        with torch.inference_mode():
            scores = self.token_scores(input_ids, mask).float().cpu()
        return [[float(scores[row, p]) for p in positions] for row, (_, positions) in enumerate(batch)]

    def _check_positions(self, positions: list[int], steps: tuple[str, ...], marker: str) -> list[int]:
        if len(positions) != len(steps):
            raise RuntimeError(f"PRM {self.name}: {len(steps)} steps but {len(positions)} {marker!r} tokens in its "
                               f"input; the tokenizer does not keep {marker!r} as one token")
        return positions


def load_base_model(prm_path: str, recipe):
    """(base model without its LM head, tokenizer, device): the hidden states a value or
    classification head reads. Heads are loaded by `load_head`, never by remote code."""
    from transformers import AutoModel, AutoTokenizer

    from ..models import pick_device, pick_dtype, resolve_model

    device = pick_device(recipe.device)
    dtype = pick_dtype(recipe.dtype, device)
    source = resolve_model(prm_path)
    log.info("loading PRM %s (%s, %s)", prm_path, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # The checkpoints name their own head classes in `auto_map`; the base is plain transformers code.
    model = AutoModel.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    model.to(device).eval()
    return model, tokenizer, device


_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def load_head(prm_path: str, prefix: str) -> dict:
    """The checkpoint tensors whose names start with `prefix` (e.g. "v_head."), prefix removed."""
    import json

    from transformers.utils import cached_file

    from ..models import resolve_model

    source = resolve_model(prm_path)
    for name in _WEIGHT_FILES:
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(Path(path).read_text())["weight_map"]
            files = sorted({f for key, f in weight_map.items() if key.startswith(prefix)})
            paths = [cached_file(source, f) for f in files]
        else:
            paths = [path]
        tensors = {}
        for p in paths:
            tensors.update(_read_tensors(p, prefix))
        if not tensors:
            raise RuntimeError(f"prm_path={prm_path!r}: the checkpoint ({name}) holds no {prefix}* weights; "
                               f"is prm_family right for this model?")
        return {key[len(prefix):]: value for key, value in tensors.items()}
    raise RuntimeError(f"prm_path={prm_path!r}: none of {_WEIGHT_FILES} found in {source}")


def _read_tensors(path: str, prefix: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value for key, value in state.items() if key.startswith(prefix)}
