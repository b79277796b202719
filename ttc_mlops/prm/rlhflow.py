"""RLHFlow's +/- PRM format, on any causal LM with a chat template.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.prm.rlhflow import RLHFlowPRM; \
print(RLHFlowPRM(Recipe(prm_path='embedded:SmolLM2-135M-Instruct')).score(['1+1?'], [['2\\n\\nSo 2']]))"

Each step is a user turn answered by an assistant "+"; the step's score is
P("+") / (P("+") + P("-")) at the position where the assistant's answer is predicted. With
RLHFlow/Llama3.1-8B-PRM-{Deepseek,Mistral}-Data this is the published PRM.

Sequences are batched by `prm_batch_size` (the reference ignores it), similar lengths together
(less padding). A completion's step scores depend only on its own prefix, so scores are cached by
(problem, steps): a completion scored before, or named twice in a call, costs nothing. A
step-level search still runs a beam's whole prefix again when it grows by a step: the KV cache of
a prefix is not kept between calls (it would cost accelerator memory per live beam). The cache
lives as long as its problem is being scored: a call that does not name a problem drops that
problem's entries, so memory stays bounded by one search batch.
"""

from __future__ import annotations

import logging

from . import split_steps

log = logging.getLogger(__name__)


class RLHFlowPRM:
    def __init__(self, recipe):
        from ..models import load_causal_lm

        self.name = recipe.prm_path
        self.model, self.tokenizer, self.device = load_causal_lm(recipe.prm_path, recipe)
        self.batch_size = recipe.prm_batch_size
        self.plus_id = self.tokenizer.encode("+", add_special_tokens=False)[-1]
        self.minus_id = self.tokenizer.encode("-", add_special_tokens=False)[-1]
        self._cache: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        self.tokens_processed = 0  # PRM input tokens run through the model

    def clear_cache(self) -> None:
        self._cache.clear()

    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[list[float]]]:
        current = set(problems)
        self._cache = {k: v for k, v in self._cache.items() if k[0] in current}
        todo: dict[tuple[str, tuple[str, ...]], None] = {}
        keys = [[(problem, tuple(split_steps(c))) for c in comps] for problem, comps in zip(problems, completions)]
        for row in keys:
            for key in row:
                if key not in self._cache:
                    todo[key] = None
        pending = sorted(todo, key=lambda key: len(key[0]) + sum(len(step) for step in key[1]))
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            for key, scores in zip(batch, self._score_batch(batch)):
                self._cache[key] = scores
        return [[list(self._cache[key]) for key in row] for row in keys]

    def _conversation(self, problem: str, steps: tuple[str, ...]) -> tuple[str, list[int]]:
        """The chat text and the character offset of each assistant "+" in it."""
        messages, offsets = [], []
        for k, step in enumerate(steps):
            messages.append({"role": "user", "content": f"{problem} {step}" if k == 0 else step})
            prefix = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            offsets.append(len(prefix))
            messages.append({"role": "assistant", "content": "+"})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return text, offsets

    def _score_batch(self, batch: list[tuple[str, tuple[str, ...]]]) -> list[list[float]]:
        import torch

        texts, offsets = zip(*(self._conversation(p, s) for p, s in batch))
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                             padding=True, return_tensors="pt")
        mapping = enc.pop("offset_mapping")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        self.tokens_processed += int(enc["attention_mask"].sum())
        with torch.inference_mode():
            logits = self.model(**enc).logits[:, :, [self.plus_id, self.minus_id]].float()
        probs = logits.softmax(dim=-1)[:, :, 0].cpu()
        results = []
        for row, row_offsets in enumerate(offsets):
            starts = {int(s): t for t, (s, e) in enumerate(mapping[row].tolist()) if e > s}
            scores = []
            for char in row_offsets:
                t = starts.get(char)
                if t is None:
                    raise RuntimeError(f"PRM {self.name}: no token starts at the assistant answer (offset {char}); "
                                       f"the chat template splits '+' from its turn")
                scores.append(float(probs[row, t - 1]))  # logits at t-1 predict token t
            results.append(scores)
        return results
