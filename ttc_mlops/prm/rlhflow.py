"""RLHFlow's +/- PRM format, on any causal LM with a chat template.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.prm.rlhflow import RLHFlowPRM; \
print(RLHFlowPRM(Recipe(prm_path='embedded:SmolLM2-135M-Instruct')).score(['1+1?'], [['2\\n\\nSo 2']]))"

Each step is a user turn answered by an assistant "+"; the step's score is
P("+") / (P("+") + P("-")) at the position where the assistant's answer is predicted. With
RLHFlow/Llama3.1-8B-PRM-{Deepseek,Mistral}-Data this is the published PRM.

Sequences are batched by `prm_batch_size` (the reference ignores it), similar lengths together
(less padding). A step's score depends only on the problem and the steps up to it, so scores are
cached per step prefix: a completion scored before, or named twice in a call, costs nothing, and a
beam that grew by one step needs one new score. The keys and values of every conversation run are
kept too (`PrefixStore`, up to `prefix_cache_gib`), so scoring that new step runs only its own
tokens, not the whole prefix again (the reference re-runs it at every iteration). The score cache
lives as long as its problem is being scored: a call that does not name a problem drops that
problem's entries; the key/value store is bounded by its byte budget.

Only the two logits that matter are computed, at the positions that matter: the base model's
hidden states times the "+" and "-" rows of the output layer, not the vocabulary at every position.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from . import split_steps

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One conversation to run: ids through its last "+", the token index of each "+", the first
    step without a score, and the head (everything up to the end of the problem statement)."""

    key: tuple[str, tuple[str, ...]]
    ids: list[int]
    plus_at: list[int]
    first_new: int
    head: list[int]

    @property
    def reuse_limit(self) -> int:
        return self.plus_at[self.first_new] - 1  # the position that predicts the first unscored "+" must run


class RLHFlowPRM:
    def __init__(self, recipe):
        from ..kvcache import store_for
        from ..models import load_causal_lm

        self.name = recipe.prm_path
        self.model, self.tokenizer, self.device = load_causal_lm(recipe.prm_path, recipe)
        self.batch_size = recipe.prm_batch_size
        self.plus_id = self.tokenizer.encode("+", add_special_tokens=False)[-1]
        self.minus_id = self.tokenizer.encode("-", add_special_tokens=False)[-1]
        self._scores: dict[tuple[str, tuple[str, ...]], float] = {}  # (problem, steps 1..j) -> step j's score
        self.store = store_for(self.model, recipe.prefix_cache_gib, f"PRM {self.name}")
        self.tokens_processed = 0  # PRM input tokens run through the model

    def clear_cache(self) -> None:
        self._scores.clear()
        if self.store is not None:
            self.store.clear()

    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[list[float]]]:
        current = set(problems)
        self._scores = {k: v for k, v in self._scores.items() if k[0] in current}
        keys = [[(problem, tuple(split_steps(c))) for c in comps] for problem, comps in zip(problems, completions)]
        todo = [self._row(key) for key in dict.fromkeys(key for row in keys for key in row) if key not in self._scores]
        if todo:
            self._run(todo)
        return [[[self._scores[(p, steps[:j])] for j in range(1, len(steps) + 1)] for p, steps in row] for row in keys]

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

    def _row(self, key: tuple[str, tuple[str, ...]]) -> _Row:
        problem, steps = key
        text, offsets = self._conversation(problem, steps)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = {s: t for t, (s, e) in enumerate(enc["offset_mapping"]) if e > s}
        missing = [char for char in offsets if char not in starts]
        if missing:
            raise RuntimeError(f"PRM {self.name}: no token starts at the assistant answer (offset {missing[0]}); "
                               f"the chat template splits '+' from its turn")
        plus_at = [starts[char] for char in offsets]
        head = text.index(problem) + len(problem)  # the candidates of a problem share all before here
        return _Row(key, enc["input_ids"][: plus_at[-1] + 1], plus_at,
                    next(j for j in range(len(steps)) if (problem, steps[: j + 1]) not in self._scores),
                    enc["input_ids"][: sum(1 for _, end in enc["offset_mapping"] if end <= head)])

    def _run(self, rows: list[_Row]) -> None:
        from ..kvcache import warm

        base, pad = self.model.base_model, self.tokenizer.pad_token_id
        # a problem's candidates share its statement: run it once, not once per candidate
        shared = [h for h, count in Counter(tuple(r.head) for r in rows).items() if count > 1]
        for start in range(0, len(shared), self.batch_size):
            self.tokens_processed += warm(base, self.store, shared[start : start + self.batch_size], pad)
        # batches by the tokens each row still has to run (similar amounts together: less padding)
        if self.store is not None:
            rows = sorted(rows, key=lambda r: len(r.ids) - self.store.match(r.ids, r.reuse_limit)[1])
        else:
            rows = sorted(rows, key=lambda r: len(r.ids))
        for start in range(0, len(rows), self.batch_size):
            self._score_batch(rows[start : start + self.batch_size])

    def _score_batch(self, batch: list[_Row]) -> None:
        import torch

        from ..kvcache import prefill, row_kv

        pre = prefill(self.model.base_model, [r.ids for r in batch], self.store, self.tokenizer.pad_token_id,
                      reuse_limits=[r.reuse_limit for r in batch])
        self.tokens_processed += pre.ran
        hidden = pre.out.last_hidden_state
        head = self.model.get_output_embeddings()
        width = hidden.shape[1]
        with torch.inference_mode():
            for i, r in enumerate(batch):
                (problem, steps), j0 = r.key, r.first_new
                cols = torch.tensor([width - len(r.ids) + t - 1 for t in r.plus_at[j0:]], device=hidden.device)
                logits = self._plus_minus(hidden[i, cols], head)  # position t-1 predicts the "+" at t
                for j, p in enumerate(logits.softmax(-1)[:, 0].tolist(), start=j0):
                    self._scores[(problem, steps[: j + 1])] = p
                if self.store is not None:
                    self.store.add(r.ids, lambda i=i: row_kv(pre.cache, i, pre.attention[i]))

    def _plus_minus(self, hidden, head):
        """Logits of "+" and "-" from final hidden states: two rows of the output layer."""
        import torch

        weight = head.weight[[self.plus_id, self.minus_id]]
        bias = head.bias[[self.plus_id, self.minus_id]] if getattr(head, "bias", None) is not None else None
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits
