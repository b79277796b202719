"""An example PRM family from another package: a linear probe on a causal LM's last hidden state.

    pip install -e tests/plugin_example && ttc validate recipes/SmolLM2-135M-Instruct/beam_search.yaml

The checkpoint is a causal LM plus one extra tensor, `probe.weight` [1, hidden size] (and
optionally `probe.bias`), written beside the model's own: a probe trained on its hidden states.
The input is the problem and a newline, then every step followed by a blank line; a step's score
is sigmoid(probe(h)) at that blank line, h the last hidden state. Subclassing `StepwisePRM` brings
the score cache and prefix reuse; this file only says how to build the input and read a score.
"""

from __future__ import annotations

from ttc_mlops.prm.stepwise import StepwisePRM, load_base_model, load_head


class LinearProbePRM(StepwisePRM):
    def __init__(self, settings):
        import torch

        super().__init__(settings, *load_base_model(settings))
        probe = load_head(settings.path, "probe.")
        hidden = self.base.config.hidden_size
        if tuple(probe["weight"].shape) != (1, hidden):
            raise RuntimeError(f"PRM {self.name}: probe.weight has shape {tuple(probe['weight'].shape)}, "
                               f"expected (1, {hidden})")
        self.probe = torch.nn.Linear(hidden, 1, bias="bias" in probe).to(self.device, self.base.dtype)
        self.probe.load_state_dict(probe)
        self.probe.eval()
        self.step_end = self.tokenizer.encode("\n\n", add_special_tokens=False)

    def encode(self, problem: str, steps: tuple[str, ...]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids = tok.encode(problem + "\n", add_special_tokens=False)
        positions = []
        for step in steps:
            ids += tok.encode(step.strip(), add_special_tokens=False) + self.step_end
            positions.append(len(ids) - 1)
        return ids, positions

    def step_scores(self, hidden):
        return self.probe(hidden).float().squeeze(-1).sigmoid()
