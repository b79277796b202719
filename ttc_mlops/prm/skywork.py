"""Skywork-o1-Open-PRM (Skywork/Skywork-o1-Open-PRM-Qwen-2.5-{1.5B,7B}): a value head over step ends.

    ttc run recipes/Qwen2.5-1.5B-Instruct/best_of_n.yaml --set prm_path=Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B

Skywork ship these with their own `skywork-o1-prm-inference` code (a trl-style value-head
wrapper). The same forward, in plain transformers: the Qwen2 base model's last hidden states go
through the checkpoint's `v_head.summary` linear layer, and the sigmoid of its output at each
step-end token is the step's score. The input follows their `prepare_input`:
`BOS + problem + "\\n"`, then every step's tokens followed by one "\\n" token, which carries the
step's score. Their reference splits a response at every "\\n"; here a step is what the search
calls a step (text between blank lines), so a step's inner line breaks are plain tokens.
"""

from __future__ import annotations

from .stepwise import StepwisePRM, load_base, load_head

STEP_TOKEN = "\n"


class SkyworkPRM(StepwisePRM):
    vllm = True  # the value head is read from the checkpoint, vLLM runs the Qwen2 base

    def __init__(self, settings):
        import torch

        super().__init__(settings, *load_base(settings))
        head = load_head(settings.path, "v_head.summary.")
        hidden = self.forward.hidden_size
        shape = tuple(head["weight"].shape) if "weight" in head else None
        if shape != (1, hidden):
            raise RuntimeError(f"PRM {self.name}: v_head.summary.weight has shape {shape}, expected (1, {hidden})")
        # The head runs in float32: one dot product per token, and the sigmoid is sensitive near 0 and 1.
        self.v_head = torch.nn.Linear(hidden, 1, bias="bias" in head).to(self.device)
        self.v_head.load_state_dict(head)
        self.v_head.eval()
        tok = self.tokenizer
        self.step_id = tok.encode(STEP_TOKEN, add_special_tokens=False)[-1]
        self.prefix_ids = [tok.bos_token_id] if tok.bos_token is not None else []

    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids = self.prefix_ids + tok.encode(problem + STEP_TOKEN, add_special_tokens=False)
        positions = []
        for step in steps:
            ids += tok.encode(step.strip(), add_special_tokens=False) + [self.step_id]
            positions.append(len(ids) - 1)
        return ids, positions

    def step_scores(self, hidden):
        return self.v_head(hidden.float()).squeeze(-1).sigmoid()
