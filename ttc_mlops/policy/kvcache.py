"""Prefix KV reuse for the transformers backends: a forward pass skips the tokens it has run before.

    python -c "from ttc_mlops.policy.kvcache import PrefixStore; print(PrefixStore(1 << 20).match([1, 2, 3]))"

Step-level search sends the same prefixes again and again: iteration k's prompt is iteration k-1's
prompt plus the step just sampled, and the PRM's conversation for k steps extends the one for k-1
steps. `PrefixStore` keeps the keys and values of sequences run before (one entry per sequence,
padding removed), and finds the longest cached prefix of a new sequence through chained hashes of
16-token blocks, as vLLM's prefix cache does. `prefill` then runs only the new tokens of each row,
with the cached ones laid into the batch's KV cache:

    row r:   [pad .. | cached prefix (p_r tokens) | pad .. | new tokens (s_r)]
             '------------ past, P = max p_r ----'-------- input, S = max s_r -'

Holes are masked and positions are explicit, so a row's logits equal those of a plain forward pass
up to float rounding. Entries are evicted least recently used beyond a byte budget; an entry that a
newer one extends is dropped at once (the newer one serves every lookup the older one did).

The batch's cache is a `DynamicCache` whose layers append into spare room (`GrowingLayer`) instead
of concatenating the whole history for every decoded token, which costs O(rows x context) copies
per token and dominates wide batches on a CPU. For decoding on a CPU, `share_prompts` turns it into
one that holds each distinct prompt once and each row's own tokens apart (`SharedPromptLayer`):
N samples of a prompt then read its keys and values once a step, not N times, and
`_decode_attention` attends over it with batched matmuls (sdpa's CPU kernels work on blocks of
queries, and a decoding step has one query a row).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)

BLOCK = 16  # tokens per hashed block; matches are found at block granularity, then extended
ROOM = 128  # spare positions a growing cache layer allocates at a time


@dataclass
class _Entry:
    ids: tuple[int, ...]
    kv: object  # tensor [layers, 2, kv_heads, len(ids), head_dim]
    hashes: list[int]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def _block_hashes(ids) -> list[int]:
    out, h = [], 0
    for end in range(BLOCK, len(ids) + 1, BLOCK):
        h = hash((h, tuple(ids[end - BLOCK : end])))
        out.append(h)
    return out


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixStore:
    """Keys and values of token sequences run before, looked up by longest common prefix."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._index: dict[int, set[int]] = {}  # block-chain hash -> entries holding that prefix
        self._next = 0
        self.nbytes = 0
        self.hit_tokens = 0  # tokens served from the store
        self.miss_tokens = 0  # tokens that had to be run

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.nbytes = 0

    def match(self, ids, limit: int | None = None) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with `ids`, and that length (at most `limit`)."""
        key, n = self._best(ids, limit)
        if key is None:
            return None, 0
        self._entries.move_to_end(key)
        return self._entries[key], n

    def _best(self, ids, limit: int | None = None) -> tuple[int | None, int]:
        limit = len(ids) if limit is None else min(limit, len(ids))
        found: set[int] = set()
        for h in _block_hashes(ids[:limit]):
            holders = self._index.get(h)
            if not holders:
                break
            found = holders
        best, best_len = None, 0
        for key in found:
            n = min(_common_prefix(self._entries[key].ids, ids), limit)
            if n > best_len:
                best, best_len = key, n
        return best, best_len

    def add(self, ids, make_kv) -> None:
        """Keep `make_kv()` (layers x 2 x heads x len(ids) x dim) for `ids`, unless a held sequence
        already covers `ids`; drops what it extends, then the least recently used beyond the budget."""
        ids = tuple(ids)
        if self.budget <= 0 or len(ids) < BLOCK:
            return
        held, n = self._best(ids)
        if held is not None and n == len(ids):
            return  # already held, as it is or inside a longer sequence
        entry = _Entry(ids, make_kv(), _block_hashes(ids))
        if entry.nbytes > self.budget:
            return
        if held is not None and n == len(self._entries[held].ids):
            self._drop(held)  # the new entry extends it
        key, self._next = self._next, self._next + 1
        self._entries[key] = entry
        for h in entry.hashes:
            self._index.setdefault(h, set()).add(key)
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        for h in entry.hashes:
            holders = self._index.get(h)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._index[h]


def reusable(model) -> bool:
    """Whether cached prefixes can be laid into this model's cache: every layer is full attention
    (sliding-window and linear-attention layers keep state that a prefix copy would not restore)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def kv_bytes_per_token(model) -> int:
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


def store_for(model, gib: float, name: str) -> PrefixStore | None:
    """The prefix store of a backend (`prefix_cache_gib`), or None where the model cannot reuse
    prefixes (it then runs plain forward passes)."""
    if not reusable(model):
        log.info("%s: prefix reuse off (not every layer is full attention)", name)
        return None
    store = PrefixStore(int(gib * 2**30))
    if store.budget:
        log.info("%s: keeps up to %.1f GiB of prefix keys/values (~%d tokens)", name, gib,
                 store.budget // kv_bytes_per_token(model))
    return store


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache`; the name this model's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _keep_rows(buffer, indices):
    """`buffer[indices]` along the batch axis; in place where rows are only dropped, so that only the
    rows that move into the holes are copied, not the whole buffer."""
    import torch

    if len(indices) > buffer.shape[0]:
        return buffer[indices]
    moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(-1)
    if len(moved):
        buffer[moved] = buffer[indices[moved]]
    return buffer[: len(indices)]


def _layer_classes():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A `DynamicLayer` that writes new keys and values into spare room; `keys` / `values` are
        views of the filled part."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._k = self._v = None
            n = self.keys.shape[-2] if self.keys.numel() else 0
            add = key_states.shape[-2]
            if self._k is None or n + add > self._k.shape[-2]:
                b, h, _, d = key_states.shape
                k = key_states.new_empty((b, h, n + add + ROOM, d))
                v = value_states.new_empty((b, h, n + add + ROOM, value_states.shape[-1]))
                if n:
                    k[:, :, :n], v[:, :, :n] = self.keys, self.values
                self._k, self._v = k, v
            self._k[:, :, n : n + add] = key_states
            self._v[:, :, n : n + add] = value_states
            self.keys, self.values = self._k[:, :, : n + add], self._v[:, :, : n + add]
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized and self.keys.numel():
                n = self.keys.shape[-2]
                self._k, self._v = _keep_rows(self._k, indices), _keep_rows(self._v, indices)
                self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    class SharedPromptLayer(DynamicLayer):
        """A decoding cache layer that holds each distinct prompt's keys and values once, however many
        rows sample from it, and each row's own tokens in a zero-filled buffer with room. `update`
        returns the layer itself, which only `_decode_attention` reads."""

        def __init__(self, keys, values, rows: list[int]):
            super().__init__()
            self.prompt_k, self.prompt_v = keys.contiguous(), values.contiguous()  # [prompts, heads, P, dim]
            self.own_k = keys.new_zeros((len(rows), keys.shape[1], ROOM, keys.shape[-1]))
            self.own_v = values.new_zeros((len(rows), values.shape[1], ROOM, values.shape[-1]))
            self.filled = 0  # own positions written
            self.device, self.is_initialized = keys.device, True
            self._set_rows(rows)

        def _set_rows(self, rows: list[int]) -> None:
            """Row r samples from prompt rows[r]; it sits at slot per * rows[r] + j when it is the
            prompt's j-th row, so that a prompt's rows line up as one matrix of queries. With one row
            per prompt, in order, the slots are the rows (`slots` None: nothing to rearrange)."""
            import torch

            taken: dict[int, int] = {}
            slots = []
            for prompt in rows:
                slots.append(taken.get(prompt, 0))
                taken[prompt] = slots[-1] + 1
            self.rows, self.per = rows, max(taken.values())
            self.slots = None if rows == list(range(self.prompt_k.shape[0])) else \
                torch.tensor([self.per * p + j for p, j in zip(rows, slots)], device=self.device)

        def reserve(self, add: int) -> int:
            """Room for `add` more own positions; the keys a decoding step then attends over."""
            import torch

            if self.filled + add > self.own_k.shape[-2]:
                room = lambda x: x.new_zeros(x.shape[:2] + (ROOM, x.shape[-1]))
                self.own_k = torch.cat([self.own_k, room(self.own_k)], dim=-2)
                self.own_v = torch.cat([self.own_v, room(self.own_v)], dim=-2)
            return self.prompt_k.shape[-2] + self.own_k.shape[-2]

        def update(self, key_states, value_states, *args, **kwargs):
            self.reserve(key_states.shape[-2])
            n, self.filled = self.filled, self.filled + key_states.shape[-2]
            self.own_k[:, :, n : self.filled] = key_states
            self.own_v[:, :, n : self.filled] = value_states
            return self, self

        def get_seq_length(self) -> int:
            return self.prompt_k.shape[-2] + self.filled

        def batch_select_indices(self, indices) -> None:
            import torch

            self.own_k, self.own_v = _keep_rows(self.own_k, indices), _keep_rows(self.own_v, indices)
            rows = [self.rows[i] for i in indices.tolist()]
            if self.slots is None and len(indices) <= len(self.rows):  # prompts move with their rows
                self.prompt_k, self.prompt_v = _keep_rows(self.prompt_k, indices), _keep_rows(self.prompt_v, indices)
                rows = list(range(len(rows)))
            used = sorted(set(rows))
            if 4 * (self.prompt_k.shape[0] - len(used)) > self.prompt_k.shape[0]:
                # a quarter of the prompts lost every row: attending to them costs more than a copy
                keep = torch.tensor(used, device=self.device)
                self.prompt_k, self.prompt_v = self.prompt_k[keep], self.prompt_v[keep]
                renumbered = {p: i for i, p in enumerate(used)}
                rows = [renumbered[p] for p in rows]
            self._set_rows(rows)

        def join(self, keys, values, rows: list[int], width: int) -> None:
            """Add prompts (keys/values [prompts, heads, P', dim], right-aligned) and rows sampling from
            them (rows[i] indexes the new prompts); every prompt is left-padded to `width` positions.
            The new rows' own positions written so far stay zero (their mask covers them)."""
            import torch
            import torch.nn.functional as F

            pad = lambda x: F.pad(x, (0, 0, width - x.shape[-2], 0))
            first = self.prompt_k.shape[0]
            self.prompt_k = torch.cat([pad(self.prompt_k), pad(keys)])
            self.prompt_v = torch.cat([pad(self.prompt_v), pad(values)])
            self.own_k = torch.cat([self.own_k, self.own_k.new_zeros((len(rows),) + self.own_k.shape[1:])])
            self.own_v = torch.cat([self.own_v, self.own_v.new_zeros((len(rows),) + self.own_v.shape[1:])])
            self._set_rows(self.rows + [first + p for p in rows])

        def trim(self, prompt_cols: int, own_cols: int) -> None:
            """Drop the first `prompt_cols` prompt positions and the first `own_cols` own positions (no
            row attends to them any longer: the rows that did have left)."""
            if prompt_cols:
                self.prompt_k = self.prompt_k[:, :, prompt_cols:].contiguous()
                self.prompt_v = self.prompt_v[:, :, prompt_cols:].contiguous()
            if own_cols:
                kept = self.filled - own_cols
                for name in ("own_k", "own_v"):
                    x = getattr(self, name)
                    moved = x.new_zeros(x.shape)
                    moved[:, :, :kept] = x[:, :, own_cols : self.filled]
                    setattr(self, name, moved)
                self.filled = kept

        def row(self, r: int):
            """Row r's keys and values, prompt then own tokens: [2, heads, P + filled, dim]."""
            import torch

            p = self.rows[r]
            return torch.stack([torch.cat([self.prompt_k[p], self.own_k[r, :, : self.filled]], dim=-2),
                                torch.cat([self.prompt_v[p], self.own_v[r, :, : self.filled]], dim=-2)])

    return GrowingLayer, SharedPromptLayer


_GROWING = _SHARED = None


def new_cache(model, growing: bool):
    """An empty cache for `model`; with `growing` (full-attention models only) its layers append in place."""
    global _GROWING, _SHARED
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    if growing:
        if _GROWING is None:
            _GROWING, _SHARED = _layer_classes()
        cache.layers = [_GROWING() for _ in cache.layers]
    return cache


def share_prompts(cache, rows: list[int]) -> None:
    """Turn a prefilled growing cache into one for decoding `rows` (row r samples from prefilled row
    rows[r]) whose steps read each prefilled row once: N samples of a prompt would otherwise copy
    its keys and values N times and read them N times a step. Only `_decode_attention` reads it."""
    cache.layers = [_SHARED(layer.keys, layer.values, rows) for layer in cache.layers]


def join_prompts(cache, new, rows: list[int], attention, new_attention):
    """Add the prefilled prompts of cache `new`, and rows sampling from them (rows[i] indexes its
    prompts), to a running `share_prompts` cache. Returns the rows' joined 2D attention: `attention`
    the running rows' and `new_attention` the new rows' prompt part, each left-padded to the wider
    prompts, the new rows' own positions so far masked."""
    import torch
    import torch.nn.functional as F

    old_width = cache.layers[0].prompt_k.shape[-2]
    width = max(old_width, new_attention.shape[1])
    filled = cache.layers[0].filled
    for layer, add in zip(cache.layers, new.layers):
        layer.join(add.keys, add.values, rows, width)
    return torch.cat([F.pad(attention, (width - old_width, 0)),
                      F.pad(new_attention, (width - new_attention.shape[1], filled))])


def trim_unattended(cache, attention):
    """Drop from a running `share_prompts` cache the leading positions no row attends to any longer,
    once they are an eighth of what a step attends over: prompt padding kept for prompts whose rows
    have left, and own positions written before the rows now decoding joined (a batch fed
    continuously never empties, so they would otherwise grow for as long as it runs). Returns the
    rows' 2D attention without those columns."""
    import torch

    layer = cache.layers[0]
    width, filled = layer.prompt_k.shape[-2], layer.filled
    used = attention.any(0)
    prompt_cols = int(used[:width].int().argmax())  # every row attends to its prompt's last token
    own = used[width:]
    own_cols = int(own.int().argmax()) if bool(own.any()) else filled
    if 8 * (prompt_cols + own_cols) < width + filled or prompt_cols + own_cols < 16:
        return attention
    for layer in cache.layers:
        layer.trim(prompt_cols, own_cols)
    return torch.cat([attention[:, prompt_cols:width], attention[:, width + own_cols :]], dim=-1)


def decode_mask(cache, attention, dtype):
    """The additive mask of a decoding step over a `share_prompts` cache, [rows, 1, 1, keys]: 0 where
    `attention` (the rows' 2D mask, this step's token included) is 1, -inf over padding and over
    each row's zero-filled room. The room is attended over because a bf16 batched matmul over a view
    of the filled part takes a slow path (9x slower at 700 keys, here); given as 4D, the mask is
    taken as it is by transformers instead of built anew for every step."""
    import torch

    (width,) = {layer.reserve(1) for layer in cache.layers}
    mask = torch.full((attention.shape[0], width), float("-inf"), dtype=dtype, device=attention.device)
    mask[:, : attention.shape[1]].masked_fill_(attention.bool(), 0.0)
    return mask[:, None, None, :]


DECODE_ATTENTION = "sdpa_shared_prompts"  # sdpa, except for decoding steps over a shared-prompt cache


def use_decode_attention(model) -> bool:
    """Let `model` decode over `share_prompts` caches (every other pass stays with sdpa): on a CPU,
    for full-attention models that use sdpa. Returns whether it can."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    implementation = model.config._attn_implementation
    if next(model.parameters()).device.type != "cpu" or not reusable(model):
        return False
    if implementation == DECODE_ATTENTION:
        return True
    if implementation != "sdpa":
        return False
    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(DECODE_ATTENTION)
    return True


def _decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """One query per row against a shared-prompt cache layer (`key` is the layer): batched matmuls
    over the key/value heads, with a group's query heads as the rows of one matrix (no `repeat_kv`
    copies) and, against a prompt, the heads of all its rows. On a CPU sdpa's flash kernel works on
    blocks of queries, so one query a row pays for a whole block (half of a 40-row step's time); and
    the prompts are read once a step, not once per row. `attention_mask` is additive, over prompt
    then own keys."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, _SHARED):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = key
    rows, heads, _, dim = query.shape
    prompts, kv_heads, width, _ = layer.prompt_k.shape
    group, per = heads // kv_heads, layer.per
    q = query.reshape(rows, kv_heads, group, dim) * (dim**-0.5 if scaling is None else scaling)

    def by_prompt(x):  # [rows, kv_heads, group, n] -> [prompts, kv_heads, per * group, n]
        if layer.slots is None:
            return x
        out = x.new_zeros((prompts * per,) + x.shape[1:])
        out[layer.slots] = x
        return out.view(prompts, per, kv_heads, group, -1).transpose(1, 2).reshape(prompts, kv_heads, per * group, -1)

    def by_row(x):  # the inverse
        if layer.slots is None:
            return x
        x = x.view(prompts, kv_heads, per, group, -1).transpose(1, 2).reshape(prompts * per, kv_heads, group, -1)
        return x[layer.slots]

    scores = torch.cat([by_row(torch.matmul(by_prompt(q), layer.prompt_k.transpose(-1, -2))),
                        torch.matmul(q, layer.own_k.transpose(-1, -2))], dim=-1)
    probs = torch.softmax(scores + attention_mask, dim=-1)  # computed in float32 whatever the dtype
    shared, own = probs.split([width, layer.own_k.shape[-2]], dim=-1)
    out = by_row(torch.matmul(by_prompt(shared), layer.prompt_v)) + torch.matmul(own, layer.own_v)
    return out.reshape(rows, 1, heads, dim), None


@dataclass
class Prefilled:
    out: object  # the model output: logits of the kept positions, or hidden states of a base model
    cache: object
    attention: object  # [rows, P + S], over the cache axis
    positions: object  # [rows, S]
    reused: list[int]  # tokens of each row served from the store
    ran: int  # tokens run through the model, padding not counted


def prefill(model, rows: list[list[int]], store: PrefixStore | None, pad_id: int,
            reuse_limits: list[int] | None = None, **forward_kw) -> Prefilled:
    """One forward pass over `rows` (token ids), running only what `store` does not hold. Row r takes
    at most `reuse_limits[r]` tokens from the store (default: all but its last, whose output is
    wanted). Rows are right-aligned: every row's last token is at the last position. Without a
    store it is a plain left-padded forward pass.

    Rows that miss very different amounts (problem statements of 30 and 300 tokens) would mostly
    run padding; their reusable parts are then run first in groups of similar length and kept, so
    that the pass itself runs little more than each row's last tokens."""
    import torch

    device = next(model.parameters()).device
    limits = reuse_limits or [len(ids) - 1 for ids in rows]
    ran = _fill(model, rows, limits, store, pad_id) if store is not None and store.budget > 0 else 0
    matches = [store.match(ids, limit) if store is not None else (None, 0) for ids, limit in zip(rows, limits)]
    reused = [n for _, n in matches]
    news = [ids[n:] for ids, n in zip(rows, reused)]
    big_p, big_s = max(reused), max(len(s) for s in news)
    if store is not None:
        store.hit_tokens += sum(reused)
        store.miss_tokens += sum(len(s) for s in news)

    input_ids = torch.tensor([[pad_id] * (big_s - len(s)) + list(s) for s in news], device=device)
    attention = torch.tensor([[0] * (big_p - n) + [1] * n + [0] * (big_s - len(s)) + [1] * len(s)
                              for n, s in zip(reused, news)], device=device)
    positions = torch.tensor([[0] * (big_s - len(s)) + list(range(n, n + len(s))) for n, s in zip(reused, news)],
                             device=device)
    cache = new_cache(model, growing=store is not None)
    if big_p:
        kv = _stack_prefixes(matches, big_p, device)
        for layer_idx, layer in enumerate(cache.layers):
            layer.update(kv[layer_idx, 0], kv[layer_idx, 1])
    kw = cache_kwarg(model)
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    **{kw: cache}, **forward_kw)
    return Prefilled(out, cache, attention, positions, reused, ran + sum(len(s) for s in news))


PADDING_WASTE = 0.3  # a pass whose new tokens would be more than this share padding is grouped first


def _fill(model, rows, limits, store: PrefixStore, pad_id: int) -> int:
    """Run and keep the reusable parts of `rows` in groups of similar missing length, when one
    batch of them would be mostly padding. Returns the tokens run."""
    missing = sorted((limit - store.match(ids, limit)[1], r) for r, (ids, limit) in enumerate(zip(rows, limits)))
    width = missing[-1][0]
    if width < BLOCK or sum(n for n, _ in missing) >= (1 - PADDING_WASTE) * width * len(rows):
        return 0
    groups: list[list[int]] = [[]]
    total = 0
    for n, r in missing:
        if n < BLOCK:
            continue  # too little to be worth a pass of its own
        if groups[-1] and n * (len(groups[-1]) + 1) > (1 + PADDING_WASTE) * (total + n):
            groups.append([])
            total = 0
        groups[-1].append(r)
        total += n
    base = getattr(model, "base_model", model)
    return sum(_run_and_keep(base, store, [list(rows[r][: limits[r]]) for r in group], pad_id)
               for group in groups if group)


def _run_and_keep(model, store: PrefixStore, rows: list[list[int]], pad_id: int) -> int:
    pre = prefill(model, rows, store, pad_id)
    keep(store, pre, rows)
    return pre.ran


def keep(store: PrefixStore | None, pre: Prefilled, rows: list[list[int]]) -> None:
    """Keep every row of a prefilled batch (`rows`: the ids `prefill` was given) in `store`."""
    if store is None:
        return
    for r, ids in enumerate(rows):
        store.add(ids, lambda r=r: row_kv(pre.cache, r, pre.attention[r]))


def warm(model, store: PrefixStore | None, heads: list[list[int]], pad_id: int) -> int:
    """Run once, and keep, the heads that several rows of a coming batch start with (the system
    prompt of every problem, a problem all its candidates share): rows of one batch cannot reuse
    each other. Pass a base model (no output layer). Returns the tokens run."""
    if store is None or store.budget <= 0:
        return 0
    todo = [list(h) for h in dict.fromkeys(map(tuple, heads)) if len(h) >= BLOCK and store.match(h)[1] < len(h)]
    return _run_and_keep(model, store, todo, pad_id) if todo else 0


def common_prefix(rows: list[list[int]]) -> list[int]:
    """The longest prefix all rows share."""
    first = rows[0]
    n = min(_common_prefix(first, row) for row in rows[1:]) if len(rows) > 1 else len(first)
    return list(first[:n])


def _stack_prefixes(matches, big_p: int, device):
    """[layers, 2, rows, heads, P, dim]: each row's cached prefix right-aligned, zeros before it."""
    import torch

    like = next(e.kv for e, n in matches if n)
    layers, _, heads, _, dim = like.shape
    kv = torch.zeros((layers, 2, len(matches), heads, big_p, dim), dtype=like.dtype, device=device)
    for r, (entry, n) in enumerate(matches):
        if n:
            kv[:, :, r, :, big_p - n :] = entry.kv[:, :, :, :n]
    return kv


def row_kv(cache, row: int, attention_row):
    """Row `row`'s keys and values without padding: [layers, 2, heads, tokens, dim] (a copy)."""
    import torch

    idx = attention_row.nonzero().squeeze(-1)
    if _SHARED is not None and isinstance(cache.layers[0], _SHARED):
        return torch.stack([layer.row(row).index_select(2, idx) for layer in cache.layers])
    return torch.stack([torch.stack([layer.keys[row].index_select(1, idx), layer.values[row].index_select(1, idx)])
                        for layer in cache.layers])
