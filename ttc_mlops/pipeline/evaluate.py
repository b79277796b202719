"""Evaluating a parent run: grade its merged records at every n, log metrics (step = n), table, figure; register.

    ttc evaluate recipes/SmolLM2-135M-Instruct/best_of_n.yaml

Reads the parent's `records/merged.jsonl.gz` only (never a model), so old runs can be graded again
when the grader improves; the voting itself is `ttc_mlops.voting`. Logs the metrics (step = n), the
table and figure of accuracy against n, a per-problem table (`eval/problems.json`) and each
problem's search as pages (`eval/search-*.html`, ttc_mlops.report). The graded problems are the
parent's input dataset (`store.log_problem_set`), and a sample of them (`trace_problems`) become
MLflow traces on it (`traces.log_traces`). Evaluating the same merged records twice logs nothing
new (an old run evaluated before traces existed gets its traces then).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .. import names
from ..routing import budget_share
from ..plots import run_figure
from ..records import records_digest
from ..report import pages, search_html
from ..voting import EvaluateError, Evaluation, evaluate_records
from . import store, traces
from .model import register_version

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    parent_run_id: str
    evaluation: Evaluation
    partial: bool
    already: bool  # the same merged records were evaluated before: nothing was logged again
    registered: tuple[str, str] | None  # (registered model, version)
    best: str | None = None  # the version the `best` alias points to (None: not set, nothing scored above 0)
    traces: list[str] = field(default_factory=list)  # the trace ids written this time (none: off, or written before)


def evaluate_parent(parent_id: str, recipe, register: bool = True, workers: int | None = None) -> EvaluateResult:
    """Evaluate the parent's merged records, log metrics (step = n), table and figure, then register."""
    run = store.get_run(parent_id)
    try:
        records = store.load_records(parent_id, names.MERGED_RECORDS)
    except ValueError as err:
        raise EvaluateError(f"parent run {parent_id}: {err}") from None
    if records is None:
        raise EvaluateError(f"parent run {parent_id} has no merged records ({names.RECORDS_DIR}/"
                            f"{names.MERGED_RECORDS}): run `ttc merge --parent-run-id {parent_id}` first")
    tags = run.data.tags
    partial = tags.get(names.TAG_MERGED) == names.MERGED_PARTIAL
    evaluation = evaluate_records(records, recipe.agg_strategy, recipe.apply_voting, recipe.n, workers)
    digest = records_digest(records)
    already = tags.get(names.TAG_EVALUATED) == digest
    if already:
        log.info("parent %s: these merged records were evaluated before; metrics not logged again", parent_id)
    else:
        store.log_step_metrics(parent_id, evaluation.metrics)
        store.log_metrics(parent_id, {names.M_UNDECIDED: evaluation.undecided})
        store.log_table(parent_id, evaluation.rows, names.EVAL_TABLE)
        store.log_table(parent_id, evaluation.problems_table, names.EVAL_PROBLEMS)
        rows = {row["problem_id"]: row for row in evaluation.problems_table}
        search_pages = pages(records)
        for name, page in search_pages:
            store.log_text(parent_id, search_html(page, rows, f"{names.run_name(recipe)}: {name}"), f"{names.EVAL_DIR}/{name}")
        store.log_figure(parent_id, run_figure(evaluation.rows, title=names.run_name(recipe)), names.EVAL_PLOT)
        store.set_tags(parent_id, {names.TAG_EVALUATED: digest, names.TAG_GROUP: f"{recipe.model_label}/{recipe.approach}",
                                   names.TAG_NOTE: description(recipe, evaluation, [name for name, _ in search_pages])})
    store.ensure_experiment(store.client().get_experiment(run.info.experiment_id).name)  # its kind, for older ones
    store.log_problem_set(parent_id, recipe, [r.problem_id for r in records], digest)  # logged once per set
    written = []
    try:
        written = traces.log_traces(parent_id, recipe, records, {row["problem_id"]: row for row in evaluation.problems_table},
                                    digest)
    except Exception as err:  # the metrics stand without them; the next evaluate tries again
        log.warning("parent %s: traces not written (%s: %s); evaluate again to write them", parent_id,
                    type(err).__name__, " ".join(str(err).split())[:300])
    flops = flops_per_problem(parent_id, records, sorted(evaluation.metrics))
    if flops and (not already or names.M_FLOPS_PER_PROBLEM not in run.data.metrics):
        store.log_step_metrics(parent_id, {n: {names.M_FLOPS_PER_PROBLEM: v} for n, v in flops.items()})
    registered = best = None
    if register and partial:
        log.warning("parent %s was merged partially: not registered", parent_id)
    elif register:
        primary = names.M_ACC_WEIGHTED if recipe.apply_voting else names.M_ACC_NAIVE
        name, version, created, best = register_version(parent_id, recipe, evaluation.at(), primary)
        store.set_tags(parent_id, {names.TAG_REGISTERED: f"{name}/{version}"})
        registered = (name, version)
        log.info("%s version %s of %s", "registered" if created else "already registered as", version, name)
    return EvaluateResult(parent_id, evaluation, partial, already, registered, best, written)


def flops_per_problem(parent_id: str, records, ns: list[int]) -> dict[int, float]:
    """FLOPs per problem at each n (step = n, so accuracy can be drawn against compute): the `flops`
    the parent's chunk runs logged (one run per rows, the one merge takes), over the merged problems,
    times the share of the work that voting at n keeps (`budget_share`): n / N for best-of-N and
    DVTS, whose samples / subtrees can be subsampled; all of it for beam search and compute_optimal,
    whose completions form one group. The estimate at n < N assumes every sample (subtree) costs the
    same and shares nothing with the others; with prefix reuse the prompt is run once for all of
    them, so at n < N it overstates a little. Empty where a chunk logged no `flops` (older runs)."""
    runs = sorted(store.chunk_runs(parent_id), key=lambda r: (r.data.tags.get(names.TAG_ROWS, ""),
                                                              r.info.status != "FINISHED", r.info.start_time))
    taken = {}
    for r in runs:
        taken.setdefault(r.data.tags.get(names.TAG_ROWS), r)
    if not taken or not records or any(names.M_FLOPS not in r.data.metrics for r in taken.values()):
        log.info("parent %s: a chunk run logged no %s; %s not logged", parent_id, names.M_FLOPS, names.M_FLOPS_PER_PROBLEM)
        return {}
    per_problem = sum(r.data.metrics[names.M_FLOPS] for r in taken.values()) / len(records)
    return {n: per_problem * budget_share(records, n) for n in ns}


def description(recipe, evaluation: Evaluation, search_pages: list[str]) -> str:
    """The parent's description in the UI (markdown): accuracy at every n and where to read more."""
    rules = [m for m in names.VOTING_METRICS if m in evaluation.at()]
    lines = [f"**{recipe.approach}** over `{recipe.model_path}`, PRM `{recipe.prm_path}`, on {evaluation.problems} "
             f"problems of `{recipe.dataset_name}`.", "", "| n | " + " | ".join(rules) + " |",
             "|---|" + "---|" * len(rules)]
    lines += [f"| {n} | " + " | ".join(f"{evaluation.at(n)[m]:.3f}" for m in rules) + " |" for n in sorted(evaluation.metrics)]
    lines += ["", f"Per problem (gold, selected answer, verdict, score, tokens): `{names.EVAL_PROBLEMS}` in Artifacts. "
              f"Each problem's completions and search tree: " + ", ".join(f"`{names.EVAL_DIR}/{p}`" for p in search_pages)
              + ". The full recipe: `recipe.yaml`."]
    if evaluation.undecided:
        lines.append(f"{evaluation.undecided} answer classes could not be graded (counted wrong).")
    return "\n".join(lines)
