"""The transformers policy backend: batched sampling with per-request seeds and stop strings.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.policy.hf import HFPolicy; \
from ttc_mlops.policy import Sampling; p = HFPolicy(Recipe(model_path='embedded:SmolLM2-135M-Instruct').policy_settings); \
print(p.generate([p.chat_prompt('', 'What is 2+3?')], Sampling(max_tokens=32), [0]))"

`model.generate` samples a batch from one random stream, so a row's sample would depend on the
rows beside it. This backend runs its own decoding loop instead: one KV-cached forward pass per
token for the whole batch, then each row draws from its own `torch.Generator` seeded per request.
Finished rows leave the batch at once (the last rows move into their cache slots), which is what
makes step-level search cheap: most beams stop at the step delimiter long before `max_tokens`.
Prompts and the rows that stopped at a step are kept in a `PrefixStore` (`prefix_cache_gib`): the
next iteration's prompt is one of them plus its step, so only the step's last tokens run again.
On a CPU, decoding steps attend over a cache that holds each distinct prompt once however many
requests sample from it (`kvcache.share_prompts`), through batched matmuls instead of sdpa.
"""

from __future__ import annotations

import logging

from ..config import PolicySettings
from . import Generation, Sampling, chat_prompt

log = logging.getLogger(__name__)

MAX_BATCH = 64  # rows per decoding loop; bounds the KV cache on small machines


class HFPolicy:
    def __init__(self, settings: PolicySettings, max_batch: int = MAX_BATCH):
        from ..models import compute_params, load_causal_lm
        from .kvcache import store_for, use_decode_attention

        self.name = settings.path
        self.model, self.tokenizer, self.device = load_causal_lm(settings)
        if settings.chat_template is not None:
            self.tokenizer.chat_template = settings.chat_template
        self.max_batch = max_batch
        self.progress = None  # called with the tokens each decoding step sampled
        self.params = compute_params(self.model)
        self.prompt_tokens = 0  # prompt tokens run through the model (prefix reuse spares the rest)
        self.prompt_tokens_full = 0  # every prompt token of every request
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = set(eos) | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        # A prompt of the next iteration is a prompt of this one plus a sampled step: keep both.
        self.store = store_for(self.model, settings.prefix_cache_gib, f"policy {self.name}")
        # decoding steps attend over caches that hold each prompt once (CPU, sdpa models)
        self.shared_prompts = use_decode_attention(self.model)

    def clear_cache(self) -> None:
        if self.store is not None:
            self.store.clear()

    def chat_prompt(self, system: str, user: str) -> str:
        return chat_prompt(self.tokenizer, system, user)

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        # Similar lengths together: less padding. Results go back in the caller's order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: dict[int, Generation] = {}
        for start in range(0, len(order), self.max_batch):
            idx = order[start : start + self.max_batch]
            for i, gen in zip(idx, self._generate_batch([prompts[i] for i in idx], sampling, [seeds[i] for i in idx])):
                results[i] = gen
        return [results[i] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        import torch

        from .kvcache import (cache_kwarg, common_prefix, decode_mask, keep, prefill, row_kv, share_prompts,
                              warm)

        # Identical prompts (N samples of a problem, M expansions of a beam) are prefilled once and
        # their keys and values shared by their rows (copied where the cache cannot share): the
        # prompt, not the sampled tokens, dominates the work on a CPU. Prefixes run by earlier calls
        # come from the store.
        unique = list(dict.fromkeys(prompts))
        row_of = {p: i for i, p in enumerate(unique)}
        enc = [self.tokenizer(p, add_special_tokens=False).input_ids for p in unique]
        generators = [torch.Generator(device=self.device).manual_seed(int(s) % (2**63)) for s in seeds]
        self.prompt_tokens_full += sum(len(enc[row_of[p]]) for p in prompts)
        if len(enc) > 1:  # e.g. the system prompt of every problem: run it once
            self.prompt_tokens += warm(self.model.base_model, self.store, [common_prefix(enc)], self.pad_id)
        pre = prefill(self.model, enc, self.store, self.pad_id, logits_to_keep=1)
        self.prompt_tokens += pre.ran
        keep(self.store, pre, enc)
        cache, attention = pre.cache, pre.attention
        logits, step_pos = pre.out.logits[:, -1, :].float(), pre.positions[:, -1:]
        rows = [row_of[p] for p in prompts]
        if self.shared_prompts:  # decoding steps read each prompt's keys and values once, not once per request
            share_prompts(cache, rows)
        if len(unique) < len(prompts):  # one row per request from here on
            index = torch.tensor(rows, device=self.device)
            if not self.shared_prompts:
                cache.batch_select_indices(index)
            attention, step_pos, logits = attention[index], step_pos[index], logits[index]

        batch = list(range(len(prompts)))  # each batch row's request
        tokens: list[list[int]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        kw = cache_kwarg(self.model)
        computed = 0  # batch rows run by decoding steps
        with torch.inference_mode():
            for _ in range(sampling.max_tokens):
                sampled = self._sample(logits, sampling, [generators[row] for row in batch])
                next_ids = []
                for b, (row, token) in enumerate(zip(batch, sampled)):
                    tokens[row].append(token)
                    next_ids.append(token)
                    finish[row] = self._finished(tokens[row], sampling)
                    if finish[row] == "stop" and self.store is not None:
                        # the next prompt of a search is this one plus the step: keep what was run
                        self.store.add(enc[row_of[prompts[row]]] + tokens[row][:-1],
                                       lambda b=b: row_kv(cache, b, attention[b]))
                if self.progress is not None:
                    self.progress(len(sampled))
                done = [finish[row] is not None for row in batch]
                if all(done):
                    break
                if any(done):  # finished rows leave at once; on a growing cache only the rows that fill holes move
                    sel = _fill_holes(done)
                    index = torch.tensor(sel, device=self.device)
                    cache.batch_select_indices(index)
                    attention, step_pos = attention[index], step_pos[index]
                    next_ids, batch = [next_ids[b] for b in sel], [batch[b] for b in sel]
                step_pos = step_pos + 1
                attention = torch.cat([attention, attention.new_ones((len(batch), 1))], dim=-1)
                computed += len(batch)
                # A shared-prompt cache is attended over whole (its mask covers the rows' room); other
                # caches get the 2D mask, from which transformers builds each layer type's own.
                mask = decode_mask(cache, attention, self.model.dtype) if self.shared_prompts else attention
                out = self.model(input_ids=torch.tensor(next_ids, device=self.device).unsqueeze(-1),
                                 attention_mask=mask, position_ids=step_pos, use_cache=True, logits_to_keep=1,
                                 **{kw: cache})
                logits = out.logits[:, -1, :].float()
        log.debug("%d rows (%d prompts, %d prompt tokens run): %d tokens sampled, %d row-steps computed",
                  len(prompts), len(unique), pre.ran, sum(map(len, tokens)), computed)
        return [self._finish(tokens[r], finish[r] or "length", sampling) for r in range(len(prompts))]

    def _finished(self, ids: list[int], sampling: Sampling) -> str | None:
        if ids[-1] in self.eos_ids:
            return "eos"
        if sampling.stop and self._hit_stop(ids, sampling.stop):
            return "stop"
        if len(ids) >= sampling.max_tokens:
            return "length"
        return None

    @staticmethod
    def _sample(logits, sampling: Sampling, generators: list) -> list[int]:
        import torch

        if sampling.temperature == 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            # keep the smallest set whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        # One uniform draw per row from the row's own stream, so a row's sample ignores its
        # neighbours, turned into a token through the row's CDF: one batched search, where
        # `torch.multinomial` per row draws an exponential for every token of the vocabulary.
        u = torch.tensor([float(torch.rand((), generator=g, device=probs.device)) for g in generators],
                         dtype=torch.float64, device=probs.device)
        cdf = probs.double().cumsum(-1)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        return picks.clamp(max=probs.shape[-1] - 1).tolist()

    def _hit_stop(self, ids: list[int], stop: tuple[str, ...]) -> bool:
        # Only the tail can hold a new stop string; a few tokens cover any delimiter.
        tail = self.tokenizer.decode(ids[-8:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    def _finish(self, ids: list[int], reason: str, sampling: Sampling) -> Generation:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if reason == "stop":
            # Cut right after the first stop string, which stays in the text (the step delimiter).
            cut = min((text.find(s) + len(s) for s in sampling.stop if s in text), default=len(text))
            text = text[:cut]
        return Generation(text=text, num_tokens=len(ids), finish_reason=reason)


def _fill_holes(done: list[bool]) -> list[int]:
    """The rows to keep, as `batch_select_indices` takes them: the live rows beyond the new batch size
    move into the slots of finished ones, the others stay where they are."""
    size = done.count(False)
    keep = list(range(size))
    holes = [b for b in range(size) if done[b]]
    movers = [b for b in range(size, len(done)) if not done[b]]
    for hole, b in zip(holes, movers):
        keep[hole] = b
    return keep

