"""What every PRM family here shares: one sequence per (problem, steps), each step's score read from
the final hidden state at one position of it; scores cached per step prefix; prefixes run once.

    python -m pytest -q tests/test_prm_families.py tests/test_kvcache.py

A family says how a (problem, steps) pair becomes token ids plus, per step, the position whose
hidden state carries the step's score (`encode`), and how those hidden states become scores in
[0, 1] (`step_scores`). The rest is shared:

- A step's score depends only on the tokens up to its position, so scores are cached per step
  prefix: a completion scored before, or named twice in a call, costs nothing, and a beam that grew
  by one step needs one new score. The score cache lives as long as its problem is being scored: a
  call that does not name a problem drops that problem's entries.
- The keys and values of every sequence run are kept (`PrefixStore`, up to `prefix_cache_gib`), so
  scoring that new step runs only its own tokens, not the whole prefix again (the reference
  implementation re-runs it at every iteration); a statement that several candidates of a problem
  share runs once per call.
- Sequences are batched by `prm_batch_size`, those with similar amounts left to run together (less
  padding).

Models whose layers are not all full attention (a sliding window, as Mistral-7B's config declares)
run every sequence whole; their scores are still cached.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..config import PRMSettings
from . import split_steps

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """A sequence to run: its ids, the position read for each step's score, the first step without one."""

    key: tuple[str, tuple[str, ...]]
    ids: list[int]
    read_at: list[int]
    first_new: int

    @property
    def reuse_limit(self) -> int:
        return self.read_at[self.first_new]  # the first unscored step's position must run


class StepwisePRM(ABC):
    name: str

    def __init__(self, settings: PRMSettings, base, tokenizer, device):
        """`base`: the model without its output layer, whose last hidden states `step_scores` reads."""
        from ..models import compute_params
        from ..policy.kvcache import store_for

        self.name = settings.path
        self.base, self.tokenizer, self.device = base, tokenizer, device
        self.batch_size = settings.batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self._scores: dict[tuple[str, tuple[str, ...]], float] = {}  # (problem, steps 1..j) -> step j's score
        self.store = store_for(base, settings.prefix_cache_gib, f"PRM {self.name}")
        self.tokens_processed = 0  # PRM input tokens run through the model
        self.tokens_full = 0  # every token of every sequence asked for, as if nothing were reused
        self.attended = 0  # query x key positions the batched passes attended (padding included)
        self.attended_alone = 0  # what the same rows attend run one by one (no padding)
        self._lengths: dict[tuple[str, tuple[str, ...]], int] = {}  # (problem, steps) -> its sequence's tokens
        self._recent: dict[str, None] = {}  # problems by when they were last scored, oldest first
        self.params = compute_params(base)

    # --- what a family defines
    @abstractmethod
    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        """Token ids of the PRM input and, per step, the position whose hidden state scores it."""

    @abstractmethod
    def step_scores(self, hidden):
        """[k] scores in [0, 1] from [k, hidden size] final hidden states."""

    # --- shared
    def clear_cache(self) -> None:
        self._scores.clear()
        self._lengths.clear()
        self._recent.clear()
        if self.store is not None:
            self.store.clear()

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

    def _row(self, key: tuple[str, tuple[str, ...]]) -> _Row:
        problem, steps = key
        ids, read_at = self.encode(problem, steps)
        self._lengths[key] = read_at[-1] + 1
        first_new = next(j for j in range(len(steps)) if (problem, steps[: j + 1]) not in self._scores)
        return _Row(key, ids[: read_at[-1] + 1], read_at, first_new)

    def _run(self, rows: list[_Row]) -> None:
        from ..policy.kvcache import common_prefix, warm

        # several candidates of a problem share its statement: run it once, not once per candidate
        by_problem = defaultdict(list)
        for r in rows:
            by_problem[r.key[0]].append(r)
        heads = [common_prefix([r.ids[: r.reuse_limit] for r in group]) for group in by_problem.values()
                 if len(group) > 1]
        for start in range(0, len(heads), self.batch_size):
            self.tokens_processed += warm(self.base, self.store, heads[start : start + self.batch_size], self.pad_id)
        for batch in self._batches(rows):
            self._score_batch(batch)

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Batches of at most `batch_size` rows whose padded pass attends at most PADDED_ATTENTION
        times what the rows attend alone. A row's history (the prefix the store serves) and its new
        tokens are padded to the batch's longest of each, so rows of similar history and similar new
        length go together: sorted by both, a batch closes when one more row would pad too much."""
        sizes = []
        for r in rows:
            cached = self.store.match(r.ids, r.reuse_limit)[1] if self.store is not None else 0
            sizes.append((cached, len(r.ids) - cached, r))
        sizes.sort(key=lambda x: (x[0], x[1]))
        batches, current = [], []
        for size in sizes:
            grown = current + [size]
            if current and (len(grown) > self.batch_size or _padded(grown) > PADDED_ATTENTION * _alone(grown)):
                batches.append([r for _, _, r in current])
                grown = [size]
            current = grown
        if current:
            batches.append([r for _, _, r in current])
        return batches

    def _score_batch(self, batch: list[_Row]) -> None:
        import torch

        from ..policy.kvcache import keep, prefill

        pre = prefill(self.base, [r.ids for r in batch], self.store, self.pad_id,
                      reuse_limits=[r.reuse_limit for r in batch])
        self.tokens_processed += pre.ran
        news = [len(r.ids) - n for r, n in zip(batch, pre.reused)]
        self.attended += len(batch) * max(news) * pre.attention.shape[1]  # every query x every key column
        self.attended_alone += _alone([(n, s, None) for n, s in zip(pre.reused, news)])
        hidden = pre.out.last_hidden_state
        width = hidden.shape[1]  # rows are right-aligned: position t of row r is column width - len + t
        with torch.inference_mode():
            for i, r in enumerate(batch):
                (problem, steps), j0 = r.key, r.first_new
                cols = torch.tensor([width - len(r.ids) + t for t in r.read_at[j0:]], device=hidden.device)
                for j, p in enumerate(self.step_scores(hidden[i, cols]).float().tolist(), start=j0):
                    self._scores[(problem, steps[: j + 1])] = p
        keep(self.store, pre, [r.ids for r in batch])


RECENT_PROBLEMS = 1024  # problems whose step scores are kept (a few KB each)
PADDED_ATTENTION = 1.5  # a PRM batch's attention over padding, at most this times the rows' own


def _padded(sizes: list[tuple[int, int, object]]) -> int:
    """Query x key positions of one padded pass over rows of (cached, new) tokens."""
    big_p, big_s = max(p for p, _, _ in sizes), max(s for _, s, _ in sizes)
    return len(sizes) * big_s * (big_p + big_s)


def _alone(sizes: list[tuple[int, int, object]]) -> int:
    """The same rows run one by one, without padding."""
    return sum(s * (p + s) for p, s, _ in sizes)


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
