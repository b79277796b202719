"""Math-Shepherd's PRM format (peiyi9979/math-shepherd-mistral-7b-prm): a step tag after every step.

    ttc run recipes/Llama-3.2-1B-Instruct/best_of_n.yaml --set prm_path=peiyi9979/math-shepherd-mistral-7b-prm

The input is `"{problem} {step 1} ки\\n{step 2} ки"` (the model card's format), with the
tokenizer's BOS. At each step tag the model predicts the next token; the step's score is
P("+") / (P("+") + P("-")) there, the good and bad tokens being those of `"+ -"`. A tag already
in the text is removed so that it cannot fake a step.
"""

from __future__ import annotations

from .stepwise import PairHead, StepwisePRM, load_causal

STEP_TAG = "ки"
GOOD, BAD = "+", "-"


class MathShepherdPRM(StepwisePRM):
    vllm = True  # the two rows of the output layer are read from the checkpoint there

    def __init__(self, settings):
        base, tok, model = load_causal(settings)
        super().__init__(settings, base, tok)
        self.model = model  # None on vLLM
        candidates = tok.encode(f"{GOOD} {BAD}", add_special_tokens=False)
        if len(candidates) != 2:
            raise RuntimeError(f"PRM {self.name}: {GOOD!r} and {BAD!r} are not one token each "
                               f"({tok.convert_ids_to_tokens(candidates)})")
        self.good_id, self.bad_id = candidates
        self.tag_id = tok.encode(STEP_TAG, add_special_tokens=False)[-1]
        self.head = PairHead(settings.path, model, self.good_id, self.bad_id)

    def text(self, problem: str, steps: tuple[str, ...]) -> str:
        clean = [s.replace(STEP_TAG, "").strip() for s in steps]
        return f"{problem.replace(STEP_TAG, '')} " + "\n".join(f"{s} {STEP_TAG}" for s in clean)

    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        ids = self.tokenizer.encode(self.text(problem, steps))  # with BOS, as the model card
        positions = [t for t, i in enumerate(ids) if i == self.tag_id]
        return ids, self._check_positions(positions, steps, STEP_TAG)

    def step_scores(self, hidden):
        return self.head(hidden)
