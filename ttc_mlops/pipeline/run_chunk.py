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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import names
from ..config import Recipe, RecipeError
from ..data import Problem, load_dataset_problems, row_range
from ..records import Record, write_records
from ..runner import Usage, run_metrics, run_search
from ..strategies import STRATEGIES
from . import lease, store

log = logging.getLogger(__name__)


def preflight(recipe: Recipe, prompts: bool = True) -> list[Problem]:
    """Everything that can be checked before a model loads (may touch disk and read tokenizers,
    never loads weights). Returns the whole problem set. `prompts`: check the recipe's own policy's
    context against this chunk's prompts (off where the caller brings its own policy)."""
    from ..models import check_model_ref, check_prompt_lengths
    from ..prm import check_prm_backend
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
    if recipe.backend == "openai" and prompts:  # the recipe's own server answers, takes the key, serves the model
        from ..policy.openai import check_server

        check_server(recipe.policy_settings)
    check_model_ref("prm_path", recipe.prm_path)
    check_prm_backend(recipe)
    if recipe.output_dir:
        check_writable("output_dir", recipe.output_dir)
    problems = load_dataset_problems(recipe)
    start, end = row_range(len(problems), recipe)  # dataset_start past the end, too many chunks
    unanswered = [p.problem_id for p in problems if p.answer is None]
    if unanswered and recipe.require_answers:
        raise RecipeError(f"dataset_name={recipe.dataset_name!r}: {len(unanswered)} of {len(problems)} problems have no "
                          f"gold answer (no 'answer' field, nor a \\boxed{{}} in 'solution'), e.g. {unanswered[0]!r}: "
                          f"nothing could grade them. Set require_answers=false to run them anyway")
    if prompts:
        check_prompt_lengths(recipe.policy_settings, recipe.system_prompt, problems[start:end], recipe.max_tokens)
    return problems


def check_writable(field: str, directory: str) -> None:
    """The directory exists (made if need be) and takes a file: found now, not after the search."""
    import tempfile

    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ttc-write-check-"):
            pass
    except OSError as err:
        raise RecipeError(f"{field}={directory!r} cannot be written ({err.strerror or err}): choose a writable "
                          f"directory or leave {field} unset") from None


@dataclass
class ChunkResult:
    run_id: str
    parent_run_id: str
    records: list[Record]
    skipped: bool  # the chunk had finished before: nothing was run
    resumed_from: int  # records found in a checkpoint
    metrics: dict[str, float]


def run_chunk(recipe: Recipe, policy=None, prm=None, progress: bool = True) -> ChunkResult:
    """Run (or resume, or skip) this process's chunk. `policy` / `prm` default to the recipe's."""
    all_problems = preflight(recipe, prompts=policy is None)
    store.check_parent_run(recipe)
    start, end = row_range(len(all_problems), recipe)
    problems = all_problems[start:end]
    experiment_id = store.ensure_experiment(store.experiment_for(recipe))
    parent_id = store.find_or_create_parent(recipe, experiment_id)
    artifact = names.chunk_artifact(start, end)

    existing = store.find_chunk_run(parent_id, start, end)
    rows = f"{start}:{end}"
    if existing is not None and existing.info.status == "FINISHED":
        records, problem = store.load_records_tolerant(existing.info.run_id, artifact)
        if problem is None and records is not None and len(records) == len(problems):
            log.info("rows %s already finished in run %s; nothing to do", rows, existing.info.run_id)
            return ChunkResult(existing.info.run_id, parent_id, records, True, len(records),
                               dict(existing.data.metrics))
        # finished, but its records artifact is damaged or short (edited, a partial upload): the rerun
        # keeps what reads and searches the rest, as for a chunk that died part-way
        log.warning("rows %s finished in run %s, but %s: resuming it", rows, existing.info.run_id,
                    problem or f"its records artifact holds {len(records or [])} of {len(problems)} problems")
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
            store.log_problem_set(run_id, recipe, [p.problem_id for p in problems])  # its rows, in the Datasets panel
            if existing is not None:
                done = _checkpoint(run_id, artifact)
                log.info("resuming rows %s in run %s from %d saved problems", rows, run_id, len(done))
            records, metrics = _search(recipe, problems, done, run_id, artifact, policy=policy, prm=prm,
                                       progress=progress)
    except BaseException as err:
        if isinstance(err, Stopped):
            store.set_tags(run_id, {names.TAG_STOPPED_BY: err.signal})
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


def _search(recipe: Recipe, problems: list[Problem], done: list[Record], run_id: str, artifact: str, *,
            policy, prm, progress: bool) -> tuple[list[Record], dict]:
    """The core's run loop over the chunk's problems, checkpointing records and usage after every
    batch; a chunk whose every record was checkpointed finishes here without loading a model."""
    counters = f"{names.RECORDS_DIR}/{names.chunk_counters_artifact(artifact)}"
    usage = _usage(run_id, counters) if done else Usage()

    def checkpoint(records: list[Record]) -> None:
        store.log_records(run_id, records, artifact)  # the records, then what they cost
        store.log_text(run_id, json.dumps(usage.to_dict()), counters)

    records = run_search(recipe, problems, policy, prm, progress=progress, done=done, usage=usage,
                         on_batch=checkpoint)
    if len(done) == len(problems):  # nothing was searched: the records on the run are the checkpoint's
        store.log_records(run_id, records, artifact)
    if recipe.output_dir:  # a local copy besides the artifact, as the reference writes one
        write_records(records, Path(recipe.output_dir) / artifact)
    metrics = run_metrics(records, usage)
    store.log_metrics(run_id, metrics)
    return records, metrics


def _usage(run_id: str, counters: str) -> Usage:
    """What earlier processes of this chunk spent, from their checkpoint (so metrics are totals)."""
    saved = store.load_run_text(run_id, counters)
    try:
        return Usage.from_dict(json.loads(saved)) if saved is not None else Usage()
    except (ValueError, KeyError, TypeError) as err:
        log.warning("%s of run %s is unreadable (%s): this chunk's cost metrics count this process only",
                    counters, run_id, err)
        return Usage()
