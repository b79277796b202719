"""The run loop: a recipe's problems through its strategy, batch by batch, with what the work cost. No MLflow.

    python -c "import ttc_mlops as ttc; r = ttc.load_recipe('recipes/SmolLM2-135M-Instruct/best_of_n.yaml', {'num_samples': 2}); print(ttc.run_search(r, ttc.load_problems(r))[0].pred)"

`run_search` is what `ttc run` runs inside a chunk and what a notebook calls: the same recipe,
seed and problems give the same records from both. Problems are searched `search_batch_size` at a
time, and every batch starts from empty prefix caches, so a batch's records depend on its
problems, the recipe and the seed only (a resumed chunk, another chunking with the same batch
boundaries and a plain re-run give identical records). The MLflow wing observes the loop: it
passes the records an earlier process checkpointed (`done`), a `Usage` to total the cost into,
and `on_batch`, called with the records so far after every batch (its checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

from . import names
from .data import Problem, load_dataset_problems, row_range
from .grading import is_equiv
from .records import Record
from .strategies import STRATEGIES


def load_problems(recipe) -> list[Problem]:
    """The problems a run of the recipe searches: its dataset, filtered, cut to its chunk's rows."""
    problems = load_dataset_problems(recipe)
    start, end = row_range(len(problems), recipe)
    return problems[start:end]


@dataclass
class Usage:
    """What a search's work cost so far: calls, tokens and seconds, totals over every process that
    worked on the same problems (a resumed chunk starts from the counters its checkpoint holds)."""
    generate_calls: int = 0
    completion_tokens: int = 0  # every token sampled: pruned beams, rejected candidates, lookahead
    gen_s: float = 0.0
    prm_calls: int = 0
    prm_s: float = 0.0
    prompt_tokens: int = 0  # prompt / prefill tokens the policy ran (reused prefixes do not count)
    prompt_tokens_full: int = 0  # every prompt token of every request
    prm_tokens: int = 0  # tokens the PRM ran
    prm_tokens_full: int = 0  # every token of every sequence the PRM scored
    wall_s: float = 0.0  # searching, model loading excluded
    policy_params: int | None = None  # what one token's forward multiplies by; None: unknown (or not loaded)
    prm_params: int | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "Usage":
        """Counters a checkpoint holds; KeyError / TypeError / ValueError where they are not readable."""
        counted = {f.name: saved[f.name] for f in fields(cls) if not f.name.endswith("_params")}
        params = {k: saved.get(k) for k in ("policy_params", "prm_params")}
        for k, v in {**counted, **params}.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"{k}={v!r} is not a number")
        return cls(**counted, **params)


def run_search(recipe, problems: list[Problem], policy=None, prm=None, *, progress: bool = False,
               done: list[Record] = (), usage: Usage | None = None,
               on_batch: Callable[[list[Record]], None] | None = None) -> list[Record]:
    """One record per problem, in the order of `problems`. `policy` / `prm` default to the recipe's
    (loaded only when something is left to search); records in `done` are kept, not searched again."""
    strategy = STRATEGIES[recipe.approach]
    records = {r.problem_id: r for r in done}
    todo = [p for p in problems if p.problem_id not in records]
    usage = usage if usage is not None else Usage()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), unit="problem", disable=not progress,
               desc=recipe.approach, bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}{postfix}]",
               mininterval=1.0)
    plan = Progress(recipe, bar.update)
    if todo:
        policy, prm = _models(recipe, policy, prm)
        policy, prm = MeteredPolicy(policy, usage, plan.tokens), MeteredPRM(prm, usage, plan.rows)
    t0, wall_before = time.perf_counter(), usage.wall_s
    for i in range(0, len(todo), recipe.search_batch_size):
        batch = todo[i : i + recipe.search_batch_size]
        # Each batch starts from empty prefix caches: what an earlier batch left there would change
        # this one's numerics (bf16), and a resumed chunk or another chunking has no earlier batch.
        policy.clear_cache()
        prm.clear_cache()
        plan.begin(len(batch))
        for record in strategy(batch, policy, prm, recipe):
            records[record.problem_id] = record
        policy.sync()
        prm.sync()
        usage.wall_s = wall_before + time.perf_counter() - t0
        if on_batch is not None:
            on_batch([records[p.problem_id] for p in problems if p.problem_id in records])
        plan.end()
        bar.set_postfix(tok_s=f"{usage.completion_tokens / max(usage.gen_s, 1e-9):.0f}")
    bar.close()
    usage.wall_s = wall_before + time.perf_counter() - t0
    return [records[p.problem_id] for p in problems]


def _models(recipe, policy, prm):
    if policy is None:
        from .policy import load_policy

        policy = load_policy(recipe.policy_settings)
    if prm is None:
        from .prm import load_prm

        prm = load_prm(recipe.prm_settings)
    return policy, prm


# --- metering: the strategies see a policy and a PRM; these count what passes through them

class MeteredPolicy:
    """A policy whose generate calls, sampled tokens and seconds add to a `Usage`; sampled tokens
    are also reported to `on_tokens` (the progress bar), as the backend decodes where it can tell."""

    def __init__(self, policy, usage: Usage, on_tokens: Callable[[int], None] | None = None):
        self.inner, self.usage, self.on_tokens = policy, usage, on_tokens
        self.name, self.params = policy.name, policy.params
        usage.policy_params = policy.params
        policy.progress = on_tokens  # backends that decode token by token report each step
        self._synced = (policy.prompt_tokens, policy.prompt_tokens_full)  # backends count across runs

    @property
    def prompt_tokens(self) -> int:
        return self.inner.prompt_tokens

    @property
    def prompt_tokens_full(self) -> int:
        return self.inner.prompt_tokens_full

    def chat_prompt(self, system: str, user: str) -> str:
        return self.inner.chat_prompt(system, user)

    def generate(self, prompts, sampling, seeds):
        t = time.perf_counter()
        gens = self.inner.generate(prompts, sampling, seeds)
        self.usage.gen_s += time.perf_counter() - t
        self.usage.generate_calls += 1
        self.usage.completion_tokens += sum(g.num_tokens for g in gens)
        return gens

    def stream(self):
        """The policy's own stream, metered; a backend that runs in waves goes through `generate`."""
        from .policy import Streaming, Waves

        return _MeteredStream(self.usage, self.inner.stream()) if isinstance(self.inner, Streaming) else Waves(self)

    def clear_cache(self) -> None:
        self.inner.clear_cache()

    def sync(self) -> None:
        """Add the prompt tokens the backend ran since the last sync to the usage."""
        now = (self.inner.prompt_tokens, self.inner.prompt_tokens_full)
        self.usage.prompt_tokens += now[0] - self._synced[0]
        self.usage.prompt_tokens_full += now[1] - self._synced[1]
        self._synced = now


class _MeteredStream:
    """A continuous stream whose engine time and tokens count as generation: seconds spent in
    `collect` (the engine running), one generate call per `add`."""

    def __init__(self, usage: Usage, inner):
        self.usage, self.inner, self.continuous = usage, inner, inner.continuous

    def add(self, prompts, sampling, seeds):
        self.usage.generate_calls += 1
        return self.inner.add(prompts, sampling, seeds)

    def busy(self) -> int:
        return self.inner.busy()

    def collect(self):
        t = time.perf_counter()
        done = self.inner.collect()
        self.usage.gen_s += time.perf_counter() - t
        self.usage.completion_tokens += sum(g.num_tokens for _, g in done)
        return done


class MeteredPRM:
    """A PRM whose calls and seconds add to a `Usage`; the rows of every call go to `on_rows`."""

    def __init__(self, prm, usage: Usage, on_rows: Callable[[int], None] | None = None):
        self.inner, self.usage, self.on_rows = prm, usage, on_rows
        self.name, self.params = prm.name, prm.params
        usage.prm_params = prm.params
        self._synced = (prm.tokens_processed, prm.tokens_full)

    @property
    def tokens_processed(self) -> int:
        return self.inner.tokens_processed

    @property
    def tokens_full(self) -> int:
        return self.inner.tokens_full

    def score(self, problems, completions):
        t = time.perf_counter()
        scores = self.inner.score(problems, completions)
        self.usage.prm_s += time.perf_counter() - t
        self.usage.prm_calls += 1
        if self.on_rows is not None:
            self.on_rows(len(problems))
        return scores

    def clear_cache(self) -> None:
        self.inner.clear_cache()

    def sync(self) -> None:
        """Add the tokens the PRM ran since the last sync to the usage."""
        now = (self.inner.tokens_processed, self.inner.tokens_full)
        self.usage.prm_tokens += now[0] - self._synced[0]
        self.usage.prm_tokens_full += now[1] - self._synced[1]
        self._synced = now


def metered(policy, prm, usage: Usage | None = None) -> tuple[MeteredPolicy, MeteredPRM]:
    """A policy and a PRM that count into one `Usage` (benchmarks time strategies with these)."""
    usage = usage if usage is not None else Usage()
    return MeteredPolicy(policy, usage), MeteredPRM(prm, usage)


class Progress:
    """Moves a bar over a run's problems within a search batch: by sampled tokens where the
    strategy's registry entry counts no PRM rows (best-of-N: at most n x max_tokens a problem),
    else by PRM rows (rows per problem per iteration x num_iterations, while the search lives).
    `advance(k)` moves the bar by k problems (fractions too)."""

    def __init__(self, recipe, advance: Callable[[float], None]):
        self.recipe, self.advance, self.rows_per = recipe, advance, STRATEGIES[recipe.approach].rows
        self.size, self.shown, self.seen, self.plan = 0, 0.0, 0.0, 1.0

    def begin(self, size: int) -> None:
        r = self.recipe
        self.size, self.shown, self.seen = size, 0.0, 0.0
        self.plan = float(size * (r.n * r.max_tokens if self.rows_per is None else self.rows_per(r) * r.num_iterations))

    def tokens(self, count: int) -> None:
        if self.rows_per is None:
            self.seen += count
            self._show(min(self.seen / self.plan, 0.9))

    def rows(self, count: int) -> None:
        if self.rows_per is not None:
            self.seen += count
            self._show(min(self.seen / self.plan, 0.95))

    def end(self) -> None:
        self._show(1.0)

    def _show(self, fraction: float) -> None:
        target = fraction * self.size
        if target > self.shown:
            self.advance(target - self.shown)
            self.shown = target


# --- what a run's records and usage come to

def accuracy(records: list[Record]) -> tuple[float | None, int]:
    """Accuracy of the selected answers over the gradable problems, and how many were not gradable
    (a gold answer that does not parse is counted, not crashed on)."""
    graded = [is_equiv(r.pred, r.answer) for r in records]
    ok = [g for g in graded if g is not None]
    return (sum(ok) / len(ok) if ok else None), len(graded) - len(ok)


def compute_metrics(usage: Usage) -> dict[str, float | None]:
    """Tokens and FLOPs (2 x parameters x tokens), as run and as they would be without prefix reuse."""
    policy, prm, gen = usage.policy_params, usage.prm_params, usage.completion_tokens

    def flops(params, tokens):
        return None if params is None else 2.0 * params * tokens

    out = {
        names.M_PROMPT_TOKENS: usage.prompt_tokens, names.M_PROMPT_TOKENS_FULL: usage.prompt_tokens_full,
        names.M_PRM_TOKENS: usage.prm_tokens, names.M_PRM_TOKENS_FULL: usage.prm_tokens_full,
        names.M_POLICY_PARAMS: policy, names.M_PRM_PARAMS: prm,
        names.M_POLICY_FLOPS: flops(policy, usage.prompt_tokens + gen),
        names.M_POLICY_FLOPS_FULL: flops(policy, usage.prompt_tokens_full + gen),
        names.M_PRM_FLOPS: flops(prm, usage.prm_tokens), names.M_PRM_FLOPS_FULL: flops(prm, usage.prm_tokens_full),
    }
    if out[names.M_POLICY_FLOPS] is not None and out[names.M_PRM_FLOPS] is not None:
        out[names.M_FLOPS] = out[names.M_POLICY_FLOPS] + out[names.M_PRM_FLOPS]
    return out


def run_metrics(records: list[Record], usage: Usage) -> dict[str, float]:
    """A chunk run's metrics: accuracy of the selected answers, tokens, seconds, FLOPs (unknowns left out)."""
    acc, ungraded = accuracy(records)
    wall = usage.wall_s
    metrics = {
        names.M_PROBLEMS: len(records),
        names.M_COMPLETION_TOKENS: sum(t for r in records for t in r.completion_tokens if t is not None),
        names.M_WALL_S: wall,
        names.M_TOKENS_PER_S: usage.completion_tokens / wall if wall > 0 else 0.0,
        names.M_ACC_SELECTED: acc,
        names.M_UNGRADED: ungraded,
        names.M_GENERATE_CALLS: usage.generate_calls,
        names.M_GENERATED_TOKENS: usage.completion_tokens,
        names.M_GEN_S: usage.gen_s,
        names.M_PRM_S: usage.prm_s,
        names.M_OTHER_S: max(wall - usage.gen_s - usage.prm_s, 0.0),
        **compute_metrics(usage),
    }
    return {k: v for k, v in metrics.items() if v is not None}
