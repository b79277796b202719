"""RLHFlow's +/- PRM format, on any causal LM with a chat template.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.prm.rlhflow import RLHFlowPRM; \
print(RLHFlowPRM(Recipe(prm_path='embedded:SmolLM2-135M-Instruct').prm_settings).score(['1+1?'], [['2\\n\\nSo 2']]))"

Each step is a user turn answered by an assistant "+"; the step's score is
P("+") / (P("+") + P("-")) at the position where the assistant's answer is predicted. With
RLHFlow/Llama3.1-8B-PRM-{Deepseek,Mistral}-Data this is the published PRM.

Score caching is `StepwisePRM`'s and prefix reuse its backend's: scoring a beam's new step runs
only that turn, not the whole conversation again. On the transformers backend sequences are batched
by `prm_batch_size` (the reference ignores it); on vLLM (`prm_backend: vllm`) the engine batches
them, and the two rows of the output layer are read from the checkpoint.
"""

from __future__ import annotations

from .stepwise import PairHead, StepwisePRM, load_causal


class RLHFlowPRM(StepwisePRM):
    vllm = True

    def __init__(self, settings):
        base, tokenizer, model = load_causal(settings)
        super().__init__(settings, base, tokenizer)
        self.model = model  # None on vLLM
        self.plus_id = tokenizer.encode("+", add_special_tokens=False)[-1]
        self.minus_id = tokenizer.encode("-", add_special_tokens=False)[-1]
        self.head = PairHead(settings.path, model, self.plus_id, self.minus_id)

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
        return self.head(hidden)
