"""Qwen2.5-Math-PRM (Qwen/Qwen2.5-Math-PRM-7B, -72B): token classification at `<extra_0>` separators.

    ttc run recipes/Qwen2.5-1.5B-Instruct/best_of_n.yaml --set prm_path=Qwen/Qwen2.5-Math-PRM-7B

The checkpoint's own class (`Qwen2ForProcessRewardModel`) is remote code; this is the same forward
without it, so `trust_remote_code` stays false: the Qwen2 base model's last hidden states go
through the checkpoint's `score` head (Linear(hidden, hidden), ReLU, Linear(hidden, 2)), and a
step's score is softmax(logits)[1] at the `<extra_0>` that ends it. The input is the model card's
chat: their system prompt, the problem as the user turn, and the steps joined and ended by
`<extra_0>` as the assistant turn.
"""

from __future__ import annotations

from .stepwise import StepwisePRM, load_base, load_head

STEP_SEP = "<extra_0>"
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class QwenMathPRM(StepwisePRM):
    vllm = True  # the score head is read from the checkpoint, vLLM runs the Qwen2 base

    def __init__(self, settings):
        import torch

        super().__init__(settings, *load_base(settings))
        head = load_head(settings.path, "score.")
        hidden = self.forward.hidden_size
        shapes = {k: tuple(v.shape) for k, v in head.items()}
        if shapes.get("0.weight") != (hidden, hidden) or shapes.get("2.weight") != (2, hidden):
            raise RuntimeError(f"PRM {self.name}: score head shapes {shapes}, expected 0.weight ({hidden}, {hidden}) "
                               f"and 2.weight (2, {hidden})")
        self.head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden, bias="0.bias" in head), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, 2, bias="2.bias" in head)).to(self.device, self.forward.head_dtype)
        self.head.load_state_dict(head)
        self.head.eval()
        ids = self.tokenizer.encode(STEP_SEP, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"PRM {self.name}: the tokenizer splits {STEP_SEP!r} into {len(ids)} tokens")
        self.sep_id = ids[0]

    def text(self, problem: str, steps: tuple[str, ...]) -> str:
        clean = [s.replace(STEP_SEP, "").strip() for s in steps]
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": problem.replace(STEP_SEP, "")},
                    {"role": "assistant", "content": STEP_SEP.join(clean) + STEP_SEP}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        ids = self.tokenizer.encode(self.text(problem, steps), add_special_tokens=False)
        positions = [t for t, i in enumerate(ids) if i == self.sep_id]
        return ids, self._check_positions(positions, steps, STEP_SEP)

    def step_scores(self, hidden):
        return self.head(hidden).float().softmax(dim=-1)[:, 1]
