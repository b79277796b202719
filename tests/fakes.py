"""Deterministic fakes that satisfy the Policy and PRM protocols (no torch needed).

FakePolicy continues a prompt with a solution drawn from the problem's script by the request's
seed (so seeds matter and are reproducible). FakePRM scores a step from its text: a step holding
"[s=0.7]" scores 0.7, any other 0.5; the right winner is obvious from the text.
"""

from __future__ import annotations

import random
import re

from ttc_mlops.policy import Generation, Sampling

PROMPT_SEP = "\nA: "


class FakePolicy:
    name = "fake-policy"
    progress = None
    params = None  # no FLOPs for a fake
    prompt_tokens = prompt_tokens_full = 0

    def __init__(self, script: dict[str, list[str]], steps: bool = False):
        self.script = script  # problem text -> candidate full solutions
        self.steps = steps
        self.calls: list[list[str]] = []

    def chat_prompt(self, system: str, user: str) -> str:
        return f"{system}\nQ: {user}{PROMPT_SEP}"

    def clear_cache(self) -> None:  # nothing is kept between calls
        pass

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        self.calls.append(list(prompts))
        out = []
        for prompt, seed in zip(prompts, seeds):
            head, prefix = prompt.split(PROMPT_SEP, 1)
            problem = head.split("\nQ: ", 1)[1]
            options = [s for s in self.script[problem] if s.startswith(prefix)] or self.script[problem]
            text = random.Random(seed).choice(options)[len(prefix):]
            reason = "eos"
            for stop in sampling.stop:
                if stop in text:
                    text = text[: text.index(stop) + len(stop)]
                    reason = "stop"
                    break
            words = text.split()
            if len(words) > sampling.max_tokens:
                text, reason = " ".join(words[: sampling.max_tokens]), "length"
            out.append(Generation(text=text, num_tokens=max(len(text.split()), 1), finish_reason=reason))
        return out


class FakePRM:
    name = "fake-prm"
    params = None
    tokens_processed = tokens_full = 0

    def __init__(self):
        self.calls = 0

    def clear_cache(self) -> None:  # nothing is kept between calls
        pass

    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[list[float]]]:
        from ttc_mlops.prm import split_steps

        self.calls += 1
        return [[[_step_score(s) for s in split_steps(c)] for c in comps] for comps in completions]


def _step_score(step: str) -> float:
    m = re.search(r"\[s=([0-9.]+)\]", step)
    return float(m.group(1)) if m else 0.5


class StepPolicy:
    """Emits scripted steps, for exact assertions on step-level search.

    `steps[problem][partial solution]` lists the next steps; within one generate call the k-th
    request for the same prompt gets option k (cyclic), so a problem's result ignores its batch.
    A step ending in a blank line continues the solution ("stop"); any other ends it ("eos").
    Without stop strings (a search's last iteration) it follows first options to the end.
    """

    name = "step-policy"
    progress = None
    params = None
    prompt_tokens = prompt_tokens_full = 0

    def __init__(self, steps: dict[str, dict[str, list[str]]]):
        self.steps = steps
        self.calls: list[list[str]] = []

    def chat_prompt(self, system: str, user: str) -> str:
        return f"{system}\nQ: {user}{PROMPT_SEP}"

    def clear_cache(self) -> None:  # nothing is kept between calls
        pass

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        from collections import Counter

        self.calls.append(list(prompts))
        seen: Counter = Counter()
        out = []
        for prompt in prompts:
            head, prefix = prompt.split(PROMPT_SEP, 1)
            script = self.steps[head.split("\nQ: ", 1)[1]]
            options = script[prefix]
            text = options[seen[prompt] % len(options)]
            seen[prompt] += 1
            while not sampling.stop and text.endswith("\n\n") and prefix + text in script:
                text += script[prefix + text][0]
            reason = "stop" if sampling.stop and text.endswith("\n\n") else "eos"
            out.append(Generation(text=text, num_tokens=len(text.split()), finish_reason=reason))
        return out


class StreamingPolicy(FakePolicy):
    """FakePolicy fed continuously: its stream finishes a few queued requests per `collect`, picked
    in a fixed pseudo-random order, so problems move on at different paces (as on vLLM's engine)."""

    def __init__(self, script: dict[str, list[str]], order: int = 1):
        super().__init__(script)
        self.order = order  # seeds the finishing order
        self.streams: list[FakeStream] = []

    def stream(self) -> FakeStream:
        self.streams.append(FakeStream(self, self.order))
        return self.streams[-1]


class FakeStream:
    continuous = True

    def __init__(self, policy: FakePolicy, seed: int = 1):
        self.policy = policy
        self.rng = random.Random(seed)
        self.queue: list[tuple[int, str, Sampling, int]] = []
        self.tickets = 0
        self.busy_at_add: list[int] = []  # requests in flight when each `add` came
        self.adds: list[tuple[list[str], list[str]]] = []  # each add's prompts, and the prompts in flight then

    def add(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[int]:
        self.busy_at_add.append(len(self.queue))
        self.adds.append((list(prompts), [q[1] for q in self.queue]))
        start, self.tickets = self.tickets, self.tickets + len(prompts)
        self.queue += [(start + i, p, sampling, s) for i, (p, s) in enumerate(zip(prompts, seeds))]
        return list(range(start, self.tickets))

    def busy(self) -> int:
        return len(self.queue)

    def collect(self) -> list[tuple[int, Generation]]:
        if not self.queue:
            return []
        picked = self.rng.sample(self.queue, self.rng.randint(1, min(3, len(self.queue))))
        self.queue = [q for q in self.queue if q not in picked]
        return [(ticket, self.policy.generate([prompt], sampling, [seed])[0]) for ticket, prompt, sampling, seed in picked]
