"""The transformers policy backend: batched sampling with per-request seeds and stop strings.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.policy.hf import HFPolicy; \
from ttc_mlops.policy import Sampling; p = HFPolicy(Recipe(model_path='embedded:SmolLM2-135M-Instruct')); \
print(p.generate([p.chat_prompt('', 'What is 2+3?')], Sampling(max_tokens=32), [0]))"

`model.generate` samples a batch from one random stream, so a row's sample would depend on the
rows beside it. This backend runs its own decoding loop instead: one KV-cached forward pass per
token for the whole batch, then each row draws from its own `torch.Generator` seeded per request.
Finished rows leave the batch (their cache rows are dropped), which is what makes step-level search
cheap: most beams stop at the step delimiter long before `max_tokens`.
"""

from __future__ import annotations

import inspect
import logging

from . import Generation, Sampling, chat_prompt

log = logging.getLogger(__name__)

MAX_BATCH = 64  # rows per decoding loop; bounds the KV cache on small machines


class HFPolicy:
    def __init__(self, recipe, max_batch: int = MAX_BATCH):
        from ..models import load_causal_lm

        self.name = recipe.model_path
        self.model, self.tokenizer, self.device = load_causal_lm(recipe.model_path, recipe)
        if recipe.custom_chat_template is not None:
            self.tokenizer.chat_template = recipe.custom_chat_template
        self.max_batch = max_batch
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = set(eos) | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        # transformers renamed `past_key_values` to `cache`; take whichever this version has
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)

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

        # Identical prompts (N samples of a problem, M expansions of a beam) are prefilled once and
        # their KV cache rows copied: the prompt, not the sampled tokens, dominates the work on a CPU.
        unique = list(dict.fromkeys(prompts))
        row_of = {p: i for i, p in enumerate(unique)}
        expand_rows = torch.tensor([row_of[p] for p in prompts], device=self.device)
        enc = [self.tokenizer(p, add_special_tokens=False).input_ids for p in unique]
        width = max(len(e) for e in enc)
        input_ids = torch.tensor([[self.pad_id] * (width - len(e)) + e for e in enc], device=self.device)
        attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator(device=self.device).manual_seed(int(s) % (2**63)) for s in seeds]

        alive = list(range(len(prompts)))  # original row of each batch row
        tokens: list[list[int]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        cache = None
        step_input, step_pos = input_ids, positions
        with torch.inference_mode():
            for _ in range(sampling.max_tokens):
                out = self.model(input_ids=step_input, attention_mask=attention, position_ids=step_pos,
                                 use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
                cache = getattr(out, self._cache_kw)
                logits = out.logits[:, -1, :].float()
                if step_input is input_ids and len(unique) < len(prompts):  # after the prefill: one row per request
                    cache.batch_select_indices(expand_rows)
                    attention, step_pos, logits = attention[expand_rows], step_pos[expand_rows], logits[expand_rows]
                next_ids = self._sample(logits, sampling, [generators[row] for row in alive])
                keep = []
                for b, row in enumerate(alive):
                    tokens[row].append(next_ids[b])
                    if next_ids[b] in self.eos_ids:
                        finish[row] = "eos"
                    elif sampling.stop and self._hit_stop(tokens[row], sampling.stop):
                        finish[row] = "stop"
                    elif len(tokens[row]) >= sampling.max_tokens:
                        finish[row] = "length"
                    else:
                        keep.append(b)
                if not keep:
                    break
                if len(keep) < len(alive):
                    sel = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(sel)
                    attention = attention[sel]
                    step_pos = step_pos[sel]
                    next_ids = [next_ids[b] for b in keep]
                    alive = [alive[b] for b in keep]
                step_input = torch.tensor(next_ids, device=self.device).unsqueeze(-1)
                step_pos = step_pos[:, -1:] + 1
                attention = torch.cat([attention, attention.new_ones((len(alive), 1))], dim=-1)
        return [self._finish(tokens[r], finish[r] or "length", sampling) for r in range(len(prompts))]

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
        # one draw per row from the row's own stream: a row's sample ignores its neighbours
        return [int(torch.multinomial(probs[b], 1, generator=g)) for b, g in enumerate(generators)]

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
