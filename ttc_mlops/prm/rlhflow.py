"""RLHFlow's +/- PRM format, on any causal LM with a chat template.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.prm.rlhflow import RLHFlowPRM; \
print(RLHFlowPRM(Recipe(prm_path='embedded:SmolLM2-135M-Instruct').prm_settings).score(['1+1?'], [['2\\n\\nSo 2']]))"

Each step is a user turn answered by an assistant "+"; the step's score is
P("+") / (P("+") + P("-")) at the position where the assistant's answer is predicted. With
RLHFlow/Llama3.1-8B-PRM-{Deepseek,Mistral}-Data this is the published PRM.

Batching, score caching and prefix reuse are `StepwisePRM`'s: scoring a beam's new step runs only
that turn, not the whole conversation again. Sequences are batched by `prm_batch_size` (the
reference ignores it).
"""

from __future__ import annotations

from .stepwise import StepwisePRM, pair_probability, require_output_head


class RLHFlowPRM(StepwisePRM):
    def __init__(self, settings):
        from ..models import load_causal_lm

        model, tokenizer, device = load_causal_lm(settings)
        require_output_head(settings.path, model)
        super().__init__(settings, model.base_model, tokenizer, device)
        self.model = model
        self.plus_id = tokenizer.encode("+", add_special_tokens=False)[-1]
        self.minus_id = tokenizer.encode("-", add_special_tokens=False)[-1]

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

    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        text, offsets = self._conversation(problem, steps)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = {s: t for t, (s, e) in enumerate(enc["offset_mapping"]) if e > s}
        missing = [char for char in offsets if char not in starts]
        if missing:
            raise RuntimeError(f"PRM {self.name}: no token starts at the assistant answer (offset {missing[0]}); "
                               f"the chat template splits '+' from its turn")
        return enc["input_ids"], [starts[char] - 1 for char in offsets]  # the position before "+" predicts it

    def step_scores(self, hidden):
        return pair_probability(self.model, hidden, self.plus_id, self.minus_id)
