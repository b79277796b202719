"""The transformers backend of the PRM families: a base model run with this project's prefix store.

    python -m pytest -q tests/test_kvcache.py -k prm

- The keys and values of every sequence run are kept (`PrefixStore`, up to `prefix_cache_gib`), so
  scoring a beam's new step runs only its own tokens, not the whole prefix again (the reference
  implementation re-runs it at every iteration); a statement that several candidates of a problem
  share runs once per call.
- Sequences are batched by `prm_batch_size`, those with similar amounts left to run together (less
  padding).

Models whose layers are not all full attention (a sliding window, as Mistral-7B's config declares)
run every sequence whole; their scores are still cached (by `StepwisePRM`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator

from ..config import PRMSettings
from .stepwise import PADDED_ATTENTION, ForwardPassBase, Row


class TransformersForward(ForwardPassBase):
    def __init__(self, base, settings: PRMSettings, pad_id: int, label: str):
        """`base`: a transformers model without its output layer (its outputs are final hidden states)."""
        from ..models import compute_params
        from ..policy.kvcache import store_for

        self.base, self.pad_id, self.batch_size = base, pad_id, settings.batch_size
        self.store = store_for(base, settings.prefix_cache_gib, label)
        self.params = compute_params(base)
        self.device, self.head_dtype, self.hidden_size = base.device, base.dtype, base.config.hidden_size
        self.tokens_processed = 0  # input tokens run through the model
        self.attended = 0  # query x key positions the batched passes attended (padding included)
        self.attended_alone = 0  # what the same rows attend run one by one (no padding)

    def clear_cache(self) -> None:
        if self.store is not None:
            self.store.clear()

    def run(self, rows: list[Row]) -> Iterator[tuple[Row, object]]:
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
            yield from self._batch(batch)

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
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

    def _batch(self, batch: list[Row]) -> list[tuple[Row, object]]:
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
        out = []
        for i, r in enumerate(batch):
            cols = torch.tensor([width - len(r.ids) + t for t in r.wanted], device=hidden.device)
            out.append((r, hidden[i, cols]))
        keep(self.store, pre, [r.ids for r in batch])
        return out


def _padded(sizes: list[tuple[int, int, object]]) -> int:
    """Query x key positions of one padded pass over rows of (cached, new) tokens."""
    big_p, big_s = max(p for p, _, _ in sizes), max(s for _, s, _ in sizes)
    return len(sizes) * big_s * (big_p + big_s)


def _alone(sizes: list[tuple[int, int, object]]) -> int:
    """The same rows run one by one, without padding."""
    return sum(s * (p + s) for p, s, _ in sizes)
