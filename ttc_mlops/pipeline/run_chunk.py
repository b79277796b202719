"""Running one chunk of a recipe as an MLflow child run: preflight, search, checkpoint, metrics.

    ttc run recipes/SmolLM2-135M-Instruct/best_of_n.yaml --set num_samples=4

Records are checkpointed to the chunk run after every search batch, so a chunk that dies part-way
continues from the problems already saved when it is run again; a chunk whose run finished is not
run again. Every search batch starts from empty prefix caches, so a batch's records depend on its
problems, the recipe and the seed only: a resumed chunk, another chunking with the same batch
boundaries and a plain re-run give identical records.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import names as N
from ..config import Recipe, RecipeError
from ..data import Problem, load_dataset_problems, row_range
from ..grading import is_equiv
from ..records import Record, write_records
from ..search import STRATEGIES
from . import lease, store

log = logging.getLogger(__name__)


def preflight(recipe: Recipe) -> list[Problem]:
    """Everything that can be checked before a model loads (may touch disk, never loads a model).
    Returns the whole problem set."""
    from ..models import check_model_ref
    from ..prm.families import family_for

    if recipe.approach not in STRATEGIES:
        raise RecipeError(f"approach={recipe.approach!r} is not implemented yet (available: {sorted(STRATEGIES)})")

    family_for(recipe.prm_path, recipe.prm_family)
    if recipe.approach == "compute_optimal":  # its table, before any model loads
        from ..search.compute_optimal import check_routes

        check_routes(recipe)
    if recipe.backend == "vllm":
        from ..policy import vllm as vllm_backend

        usable, why = vllm_backend.available(recipe.policy_settings)
        if not usable:
            raise RecipeError(f"backend='vllm' but vLLM cannot run here: {why}")
    check_model_ref("model_path", recipe.model_path)
    check_model_ref("prm_path", recipe.prm_path)
    problems = load_dataset_problems(recipe)
    row_range(len(problems), recipe)  # dataset_start past the end, too many chunks
    unanswered = [p.problem_id for p in problems if p.answer is None]
    if unanswered and recipe.require_answers:
        raise RecipeError(f"dataset_name={recipe.dataset_name!r}: {len(unanswered)} of {len(problems)} problems have no "
                          f"gold answer (no 'answer' field, nor a \\boxed{{}} in 'solution'), e.g. {unanswered[0]!r}: "
                          f"nothing could grade them. Set require_answers=false to run them anyway")
    return problems


@dataclass
class Meter:
    """Wraps a policy and a PRM to count calls, tokens and seconds without the strategies knowing,
    and to move the progress bar within a search batch: by tokens sampled (best-of-N, on backends
    that report them) and by PRM calls (one per iteration of a step-level search). The counters
    are checkpointed with the records, so a resumed chunk's metrics are totals over all its work."""
    policy: object
    prm: object
    advance: Callable[[float], None] | None = None  # moves the bar by this many problems
    generate_calls: int = 0
    completion_tokens: int = 0  # every token sampled: pruned beams, rejected candidates, lookahead
    gen_s: float = 0.0
    prm_calls: int = 0
    prm_s: float = 0.0
    before: dict[str, float] = field(default_factory=dict)  # token counts of earlier processes of this chunk
    wall_before: float = 0.0  # seconds spent by earlier processes of this chunk
    _batch: int = 0
    _shown: float = 0.0  # problems of the current batch the bar shows as done
    _plan: tuple[str, float] = ("scores", 1.0)  # what measures the batch's progress, and how much of it there is
    _seen: float = 0.0

    def __post_init__(self):
        self.policy.progress = self._tokens  # backends that decode token by token report each step
        self._start = self._counts()  # the backends' own counters run on across chunks of a process

    def _counts(self) -> dict[str, int]:
        return {"prompt_tokens": self.policy.prompt_tokens, "prompt_tokens_full": self.policy.prompt_tokens_full,
                "prm_tokens": self.prm.tokens_processed, "prm_tokens_full": self.prm.tokens_full}

    def chat_prompt(self, system: str, user: str) -> str:
        return self.policy.chat_prompt(system, user)

    def generate(self, prompts, sampling, seeds):
        t = time.perf_counter()
        gens = self.policy.generate(prompts, sampling, seeds)
        self.gen_s += time.perf_counter() - t
        self.generate_calls += 1
        self.completion_tokens += sum(g.num_tokens for g in gens)
        return gens

    def stream(self):
        """The policy's stream, metered: a backend that runs in waves goes through `generate` above."""
        from ..policy import Streaming, Waves

        return _MeteredStream(self, self.policy.stream()) if isinstance(self.policy, Streaming) else Waves(self)

    def score(self, problems, completions):
        t = time.perf_counter()
        scores = self.prm.score(problems, completions)
        self.prm_s += time.perf_counter() - t
        self.prm_calls += 1
        if self._plan[0] == "scores":  # a step-level search scores one PRM row per unit and iteration
            self._seen += len(problems)
            self._show(min(self._seen / self._plan[1], 0.95))
        return scores

    def clear_cache(self) -> None:
        self.policy.clear_cache()
        self.prm.clear_cache()

    # --- progress within a search batch
    def begin_batch(self, size: int, recipe: Recipe) -> None:
        self._batch, self._shown, self._seen = size, 0.0, 0.0
        if recipe.approach == "best_of_n":  # one generate call: its tokens, at most n x max_tokens a problem
            self._plan = ("tokens", float(size * recipe.n * recipe.max_tokens))
        else:  # one row per iteration of each problem (beam search) or subtree (DVTS), while it lives
            units = recipe.subtrees if recipe.approach == "dvts" else 1
            self._plan = ("scores", float(size * units * recipe.num_iterations))

    def end_batch(self) -> None:
        self._show(1.0)

    def _tokens(self, count: int) -> None:
        if self._plan[0] == "tokens":
            self._seen += count
            self._show(min(self._seen / self._plan[1], 0.9))

    def _show(self, fraction: float) -> None:
        target = fraction * self._batch
        if self.advance is not None and target > self._shown:
            self.advance(target - self._shown)
            self._shown = target

    # --- totals across the processes that worked on this chunk
    @property
    def name(self) -> str:
        return self.policy.name

    def counters(self, wall: float) -> dict[str, float]:
        """Totals over this chunk's work so far, earlier processes included."""
        now = self._counts()
        tokens = {k: now[k] - self._start[k] + self.before.get(k, 0) for k in now}
        return {"generate_calls": self.generate_calls, "completion_tokens": self.completion_tokens, "gen_s": self.gen_s,
                "prm_calls": self.prm_calls, "prm_s": self.prm_s, **tokens, "wall_s": self.wall_before + wall}

    def resume(self, saved: dict[str, float]) -> None:
        """Start from the counters an earlier process of this chunk checkpointed."""
        self.generate_calls, self.completion_tokens = int(saved["generate_calls"]), int(saved["completion_tokens"])
        self.gen_s, self.prm_calls, self.prm_s = saved["gen_s"], int(saved["prm_calls"]), saved["prm_s"]
        self.before = {k: saved.get(k, 0) for k in self._start}
        self.wall_before = saved["wall_s"]

    def compute(self, totals: dict[str, float]) -> dict[str, float | None]:
        """Tokens and FLOPs (2 x parameters x tokens), as run and as they would be without prefix reuse."""
        policy, prm = self.policy.params, self.prm.params
        gen = totals["completion_tokens"]

        def flops(params, tokens):
            return None if params is None else 2.0 * params * tokens

        out = {
            N.M_PROMPT_TOKENS: totals["prompt_tokens"], N.M_PROMPT_TOKENS_FULL: totals["prompt_tokens_full"],
            N.M_PRM_TOKENS: totals["prm_tokens"], N.M_PRM_TOKENS_FULL: totals["prm_tokens_full"],
            N.M_POLICY_PARAMS: policy, N.M_PRM_PARAMS: prm,
            N.M_POLICY_FLOPS: flops(policy, totals["prompt_tokens"] + gen),
            N.M_POLICY_FLOPS_FULL: flops(policy, totals["prompt_tokens_full"] + gen),
            N.M_PRM_FLOPS: flops(prm, totals["prm_tokens"]), N.M_PRM_FLOPS_FULL: flops(prm, totals["prm_tokens_full"]),
        }
        if out[N.M_POLICY_FLOPS] is not None and out[N.M_PRM_FLOPS] is not None:
            out[N.M_FLOPS] = out[N.M_POLICY_FLOPS] + out[N.M_PRM_FLOPS]
        return out


class _MeteredStream:
    """A continuous stream whose generation time and tokens count as the Meter's: seconds spent in
    `collect` (the engine running), one generate call per `add`."""

    def __init__(self, meter: Meter, inner):
        self.meter, self.inner, self.continuous = meter, inner, inner.continuous

    def add(self, prompts, sampling, seeds):
        self.meter.generate_calls += 1
        return self.inner.add(prompts, sampling, seeds)

    def busy(self) -> int:
        return self.inner.busy()

    def collect(self):
        t = time.perf_counter()
        done = self.inner.collect()
        self.meter.gen_s += time.perf_counter() - t
        self.meter.completion_tokens += sum(g.num_tokens for _, g in done)
        return done


@dataclass
class ChunkResult:
    run_id: str
    parent_run_id: str
    records: list[Record]
    skipped: bool  # the chunk had finished before: nothing was run
    resumed_from: int  # records found in a checkpoint
    metrics: dict[str, float]


def accuracy(records: list[Record]) -> tuple[float | None, int]:
    """Accuracy of the selected answers over the gradable problems, and how many were not gradable
    (a gold answer that does not parse is counted, not crashed on)."""
    graded = [is_equiv(r.pred, r.answer) for r in records]
    ok = [g for g in graded if g is not None]
    return (sum(ok) / len(ok) if ok else None), len(graded) - len(ok)


def run_chunk(recipe: Recipe, policy=None, prm=None, progress: bool = True) -> ChunkResult:
    """Run (or resume, or skip) this process's chunk. `policy` / `prm` default to the recipe's."""
    all_problems = preflight(recipe)
    store.check_parent_run(recipe)
    start, end = row_range(len(all_problems), recipe)
    problems = all_problems[start:end]
    experiment_id = store.ensure_experiment(store.experiment_for(recipe))
    parent_id = store.find_or_create_parent(recipe, experiment_id)
    artifact = N.chunk_artifact(start, end)

    existing = store.find_chunk_run(parent_id, start, end)
    rows = f"{start}:{end}"
    if existing is not None and existing.info.status == "FINISHED":
        log.info("rows %s already finished in run %s; nothing to do", rows, existing.info.run_id)
        records = store.load_records(existing.info.run_id, artifact) or []
        return ChunkResult(existing.info.run_id, parent_id, records, True, len(records), dict(existing.data.metrics))
    if existing is not None:
        run_id = existing.info.run_id
        lease.acquire(existing, rows)  # refuses while another live process works this chunk
        store.reopen(run_id)
    else:
        run_id = store.create_chunk_run(parent_id, recipe, start, end, len(all_problems))
        lease.acquire(store.get_run(run_id), rows)
    heartbeat = lease.Heartbeat(run_id)
    done: list[Record] = []
    try:
        with stop_on_signals():
            if existing is not None:
                done = _checkpoint(run_id, artifact)
                log.info("resuming rows %s in run %s from %d saved problems", rows, run_id, len(done))
            records, metrics = _search(recipe, problems, done, run_id, artifact, policy, prm, progress,
                                       STRATEGIES[recipe.approach])
    except BaseException as err:
        if isinstance(err, Stopped):
            store.set_tags(run_id, {N.TAG_STOPPED_BY: err.signal})
        store.set_status(run_id, "FAILED")  # the checkpointed records stay on the run
        raise
    finally:
        heartbeat.release()
    store.set_status(run_id, "FINISHED")
    return ChunkResult(run_id, parent_id, records, False, len(done), metrics)


def _checkpoint(run_id: str, artifact: str) -> list[Record]:
    """The records a killed process saved: what can be read is kept, the rest is said and recomputed."""
    done, problem = store.load_records_tolerant(run_id, artifact)
    if problem is not None:
        log.warning("%s: keeping the %d records before it, recomputing the rest", problem, len(done or []))
    return done or []


class Stopped(BaseException):
    """SIGTERM, SIGHUP or SIGINT (Slurm's time limit, preemption, a closed terminal, Ctrl-C) stopped the chunk."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal = signal_name


@contextmanager
def stop_on_signals():
    """Turn SIGTERM / SIGHUP / SIGINT (Ctrl-C) into `Stopped`, so the chunk run is marked FAILED (its checkpoint kept)
    instead of staying RUNNING; only where signals can be handled (the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _search(recipe, problems, done, run_id, artifact, policy, prm, progress, strategy) -> tuple[list[Record], dict]:
    from tqdm.auto import tqdm

    saved = {r.problem_id for r in done}
    todo = [p for p in problems if p.problem_id not in saved]
    records = {r.problem_id: r for r in done}
    if todo:
        if policy is None:
            from ..policy import load_policy

            policy = load_policy(recipe.policy_settings)
        if prm is None:
            from ..prm import load_prm

            prm = load_prm(recipe.prm_settings)
    bar = tqdm(total=len(problems), initial=len(done), unit="problem", disable=not progress, desc=recipe.approach,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}{postfix}]", mininterval=1.0)
    meter = Meter(policy, prm, advance=bar.update)
    counters = N.chunk_counters_artifact(artifact)
    if done:
        before = store.load_run_text(run_id, f"{N.RECORDS_DIR}/{counters}")
        try:
            if before is not None:
                meter.resume(json.loads(before))
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s/%s of run %s is unreadable (%s): this chunk's cost metrics count this process only",
                        N.RECORDS_DIR, counters, run_id, err)
    t0 = time.perf_counter()
    for i in range(0, len(todo), recipe.search_batch_size):
        batch = todo[i : i + recipe.search_batch_size]
        # Each search batch starts from empty prefix caches: what an earlier batch left there would
        # change this one's numerics (bf16), and a resumed chunk or another chunking has no earlier batch.
        meter.clear_cache()
        meter.begin_batch(len(batch), recipe)
        for record in strategy(batch, meter, prm=meter, recipe=recipe):
            records[record.problem_id] = record
        ordered = [records[p.problem_id] for p in problems if p.problem_id in records]
        store.log_records(run_id, ordered, artifact)  # checkpoint: the records, then what they cost
        store.log_text(run_id, json.dumps(meter.counters(time.perf_counter() - t0)), f"{N.RECORDS_DIR}/{counters}")
        meter.end_batch()
        bar.set_postfix(tok_s=f"{meter.completion_tokens / max(meter.gen_s, 1e-9):.0f}")
    bar.close()
    totals = meter.counters(time.perf_counter() - t0)
    ordered = [records[p.problem_id] for p in problems]
    tokens = sum(t for r in ordered for t in r.completion_tokens if t is not None)
    acc, ungraded = accuracy(ordered)
    wall = totals["wall_s"]
    metrics = {
        N.M_PROBLEMS: len(ordered),
        N.M_COMPLETION_TOKENS: tokens,
        N.M_WALL_S: wall,
        N.M_TOKENS_PER_S: totals["completion_tokens"] / wall if wall > 0 else 0.0,
        N.M_ACC_SELECTED: acc,
        N.M_UNGRADED: ungraded,
        N.M_GENERATE_CALLS: totals["generate_calls"],
        N.M_GENERATED_TOKENS: totals["completion_tokens"],
        N.M_GEN_S: totals["gen_s"],
        N.M_PRM_S: totals["prm_s"],
        N.M_OTHER_S: max(wall - totals["gen_s"] - totals["prm_s"], 0.0),
        **meter.compute(totals),
    }
    if not todo:
        store.log_records(run_id, ordered, artifact)
    if recipe.output_dir:  # a local copy besides the artifact, as the reference writes one
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        write_records(ordered, Path(recipe.output_dir) / artifact)
    metrics = {k: v for k, v in metrics.items() if v is not None}
    store.log_metrics(run_id, metrics)
    return ordered, metrics
