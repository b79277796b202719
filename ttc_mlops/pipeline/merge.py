"""Merging the chunk runs of a parent into one record set, with coverage checked against the dataset.

    ttc merge recipes/SmolLM2-135M-Instruct/best_of_n.yaml

Every problem of the recipe's problem set must come from exactly one chunk. Missing and duplicate
problems are named with the chunk runs (rows) they belong to, and nothing is written unless
`allow_partial` is given, which merges what there is and tags the parent `ttc.merged=partial`.
Bad input (a parent without chunks, a chunk of another recipe, a corrupt record file, records of
another dataset) is an error before anything is written to the parent.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml

from .. import names
from ..config import CHUNK_FIELDS, Recipe, RecipeError, build_recipe, read_yaml, recipe_yaml, yaml_problem
from ..data import Problem, load_dataset_problems
from ..records import Record, problem_set_digest, records_digest
from . import store

log = logging.getLogger(__name__)

SHOWN = 8  # problem ids named per line of a coverage report


class MergeError(Exception):
    """Merge cannot go on; the message names the parent, the chunks and the problems. Nothing was written."""


@dataclass
class Chunk:
    run_id: str
    start: int
    end: int
    status: str
    records: list[Record]

    @property
    def label(self) -> str:
        return f"rows {self.start}:{self.end} (run {self.run_id}, {self.status}, {len(self.records)} of {self.end - self.start} saved)"


@dataclass
class MergeResult:
    parent_run_id: str
    recipe: Recipe
    records: list[Record]
    total: int  # problems in the recipe's problem set
    chunks: list[Chunk]
    problems_report: list[str] = field(default_factory=list)  # one line per missing / duplicate finding

    @property
    def partial(self) -> bool:
        return bool(self.problems_report)

    @property
    def digest(self) -> str:
        return records_digest(self.records)


def strip_chunk_fields(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={k: None for k in CHUNK_FIELDS})


def parent_recipe(parent_id: str, overrides: list[str] = ()) -> Recipe:
    """The configuration of a parent run: its own recipe.yaml (written by merge) or a chunk's."""
    text = store.load_run_text(parent_id, names.RECIPE_ARTIFACT)
    source = f"run {parent_id}"
    if text is None:
        chunks = sorted(store.chunk_runs(parent_id), key=lambda r: r.info.start_time)
        if not chunks:
            raise MergeError(f"parent run {parent_id} has no chunk runs (tag {names.TAG_ROLE}={names.ROLE_CHUNK} with "
                             f"{names.TAG_PARENT}={parent_id}): run its chunks first (`ttc run ... --parent-run-id {parent_id}`)")
        source = f"chunk run {chunks[0].info.run_id}"
        text = store.load_run_text(chunks[0].info.run_id, names.RECIPE_ARTIFACT)
        if text is None:
            raise MergeError(f"{source} of parent {parent_id} has no {names.RECIPE_ARTIFACT}: cannot tell its recipe")
    data = _stored_yaml(text, f"{names.RECIPE_ARTIFACT} of {source}")
    recipe = strip_chunk_fields(build_recipe(data, overrides, source=f"{names.RECIPE_ARTIFACT} of {source}"))
    return recipe


def resolve_parent(recipe: Recipe | None, parent_run_id: str | None, overrides: list[str] = ()) -> tuple[str, Recipe]:
    """(parent run id, recipe) from exactly one of a recipe or a parent run id."""
    if (recipe is None) == (parent_run_id is None):
        raise MergeError("give exactly one of RECIPE or --parent-run-id to say which parent run")
    if recipe is not None:
        recipe = strip_chunk_fields(recipe)
        try:
            return store.find_parent(recipe).info.run_id, recipe
        except LookupError as err:
            raise MergeError(str(err)) from None
    try:
        run = store.get_run(parent_run_id)
    except LookupError as err:
        raise MergeError(str(err)) from None
    if run.data.tags.get(names.TAG_ROLE) != names.ROLE_PARENT:
        raise MergeError(f"parent_run_id={parent_run_id} is not a parent run ({names.TAG_ROLE}="
                         f"{run.data.tags.get(names.TAG_ROLE)!r}, expected {names.ROLE_PARENT!r})")
    recipe = parent_recipe(parent_run_id, overrides)
    key = run.data.tags.get(names.TAG_SEARCH_KEY)
    if key != recipe.search_key:
        raise MergeError(f"parent_run_id={parent_run_id} has {names.TAG_SEARCH_KEY}={key}, but its recipe "
                         f"(with the --set overrides) has {recipe.search_key}: --set may only change fields that "
                         f"do not decide the records")
    return parent_run_id, recipe


def _recipe_diff(a: Recipe, b: Recipe) -> str:
    pa, pb = a.result_params(), b.result_params()
    return ", ".join(f"{k}={pb[k]!r} (parent: {pa[k]!r})" for k in pa if pa[k] != pb[k]) or "none"


def collect_chunks(parent_id: str, recipe: Recipe, problems: list[Problem]) -> list[Chunk]:
    """Every chunk run of the parent with its records, checked to be of this recipe and dataset."""
    runs = store.chunk_runs(parent_id)
    if not runs:
        raise MergeError(f"parent run {parent_id} has no chunk runs (tag {names.TAG_ROLE}={names.ROLE_CHUNK} with "
                         f"{names.TAG_PARENT}={parent_id}): nothing to merge")
    by_id = {p.problem_id: p for p in problems}
    # A re-run of the same rows in a new run: keep one per rows (finished first, then the oldest).
    runs.sort(key=lambda r: (r.data.tags.get(names.TAG_ROWS, ""), r.info.status != "FINISHED", r.info.start_time))
    chunks, seen_rows = [], set()
    for run in runs:
        rid, tags = run.info.run_id, run.data.tags
        rows = tags.get(names.TAG_ROWS)
        try:
            start, end = (int(x) for x in rows.split(":"))
        except (AttributeError, ValueError):
            raise MergeError(f"chunk run {rid} has {names.TAG_ROWS}={rows!r}, expected 'start:end'") from None
        if rows in seen_rows:
            log.warning("chunk run %s repeats rows %s of another chunk run; ignored", rid, rows)
            continue
        seen_rows.add(rows)
        text = store.load_run_text(rid, names.RECIPE_ARTIFACT)
        if text is not None:
            theirs = strip_chunk_fields(build_recipe(_stored_yaml(text, f"chunk run {rid}"), source=f"chunk run {rid}"))
            if theirs.search_key != recipe.search_key:
                raise MergeError(f"chunk run {rid} ({rows}) was run with another recipe than parent {parent_id}: "
                                 f"{_recipe_diff(recipe, theirs)}")
        total = tags.get(names.TAG_TOTAL)
        if total is not None and int(total) != len(problems):
            raise MergeError(f"chunk run {rid} ({rows}) was cut from a problem set of {total} problems, but "
                             f"{recipe.dataset_name} (num_samples={recipe.num_samples}) has {len(problems)}: another dataset")
        try:
            records = store.load_records(rid, names.chunk_artifact(start, end)) or []
        except ValueError as err:
            raise MergeError(f"chunk run {rid} ({rows}): {err}") from None
        for r in records:
            p = by_id.get(r.problem_id)
            if p is None or p.problem != r.problem:
                what = "is not in" if p is None else "has another problem text than"
                raise MergeError(f"chunk run {rid} ({rows}): record {r.problem_id!r} {what} dataset "
                                 f"{recipe.dataset_name}: its records come from another dataset")
            wrong = record_lengths_problem(r)
            if wrong is not None:
                raise MergeError(f"chunk run {rid} ({rows}): record {r.problem_id!r} {wrong}: the chunk's records "
                                 f"artifact was changed or written by a broken search; rerun the chunk in a new run")
            if (r.approach, r.agg_strategy) != (recipe.approach, recipe.agg_strategy):
                raise MergeError(f"chunk run {rid} ({rows}): record {r.problem_id!r} has approach={r.approach!r}, "
                                 f"agg_strategy={r.agg_strategy!r}; the parent's recipe has "
                                 f"approach={recipe.approach!r}, agg_strategy={recipe.agg_strategy!r}")
        chunks.append(Chunk(rid, start, end, run.info.status, records))
    chunks.sort(key=lambda c: (c.start, c.end))
    return chunks


PER_COMPLETION = ("step_scores", "agg_scores", "completion_tokens", "finish_reasons", "groups", "finished")
OPTIONAL_PER_COMPLETION = ("groups", "finished")  # empty in records written before these fields


def record_lengths_problem(r: Record) -> str | None:
    """What is wrong with a record's per-completion lists (one entry per completion each), or None."""
    k = len(r.completions)
    for name in PER_COMPLETION:
        value = getattr(r, name)
        if len(value) != k and not (name in OPTIONAL_PER_COMPLETION and not value):
            return f"has {len(value)} {name} for {k} completions"
    if r.selected is not None and not 0 <= r.selected < k:
        return f"has selected={r.selected} for {k} completions"
    return None


def _stored_yaml(text: str, source: str) -> dict:
    """A recipe stored on a run, read as `load_recipe` reads a file (no aliases: bounded whatever it holds)."""
    try:
        data = read_yaml(text) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{source} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a mapping of Recipe fields, got {type(data).__name__}")
    return data


def _ids(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN]) + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")


def coverage(problems: list[Problem], chunks: list[Chunk]) -> tuple[list[Record], list[str]]:
    """The merged records in dataset order (first chunk wins a duplicate) and one line per finding."""
    found: dict[str, list[tuple[Chunk, Record]]] = {}
    for chunk in chunks:
        for r in chunk.records:
            found.setdefault(r.problem_id, []).append((chunk, r))
    report = []
    # missing problems, grouped by the chunk run whose rows hold them, or by the uncovered stretch
    stretch: dict[int, str] = {}
    uncovered = [row for row in range(len(problems)) if not any(c.start <= row < c.end for c in chunks)]
    for _, run in itertools.groupby(enumerate(uncovered), key=lambda t: t[1] - t[0]):
        rows = [row for _, row in run]
        stretch.update({row: f"rows {rows[0]}:{rows[-1] + 1} (no chunk run)" for row in rows})
    missing: dict[str, list[str]] = {}
    for row, p in enumerate(problems):
        if p.problem_id not in found:
            owner = next((c for c in chunks if c.start <= row < c.end), None)
            missing.setdefault(owner.label if owner else stretch[row], []).append(p.problem_id)
    for where, ids in missing.items():
        report.append(f"missing {len(ids)} problem(s) of {where}: {_ids(ids)}")
    for p in problems:
        hits = found.get(p.problem_id, [])
        if len(hits) > 1:
            report.append(f"duplicate {p.problem_id}: in " + "; ".join(c.label for c, _ in hits))
    merged = [found[p.problem_id][0][1] for p in problems if p.problem_id in found]
    return merged, report


def merge(parent_id: str, recipe: Recipe, allow_partial: bool = False) -> MergeResult:
    """Collect and check; raises MergeError on incomplete coverage unless `allow_partial`. Writes nothing."""
    problems = load_dataset_problems(recipe)
    chunks = collect_chunks(parent_id, recipe, problems)
    merged, report = coverage(problems, chunks)
    if report and not allow_partial:
        raise MergeError(f"parent run {parent_id}: {len(merged)} of {len(problems)} problems covered exactly once "
                         f"by {len(chunks)} chunk run(s); run the missing chunks, or merge anyway with --allow-partial:\n  "
                         + "\n  ".join(report))
    if not merged:
        raise MergeError(f"parent run {parent_id}: its {len(chunks)} chunk run(s) hold no records yet")
    return MergeResult(parent_id, recipe, merged, len(problems), chunks, report)


def log_merge(result: MergeResult) -> None:
    """Write the merged records, the recipe and the coverage tags to the parent."""
    pid = result.parent_run_id
    store.log_records(pid, result.records, names.MERGED_RECORDS)
    store.log_text(pid, recipe_yaml(result.recipe), names.RECIPE_ARTIFACT)
    store.log_problem_set(pid, result.recipe, [r.problem_id for r in result.records], result.digest)  # Datasets panel
    if result.problems_report:
        store.log_text(pid, "\n".join(result.problems_report) + "\n", names.MERGE_REPORT)
    store.set_tags(pid, {
        names.TAG_MERGED: names.MERGED_PARTIAL if result.partial else names.MERGED_COMPLETE,
        names.TAG_MERGED_PROBLEMS: len(result.records),
        names.TAG_TOTAL: result.total,
        names.TAG_MERGED_DIGEST: result.digest,
        names.TAG_PROBLEM_SET: problem_set_digest(r.problem_id for r in result.records),
    })


def hub_rows(records: list[Record]) -> list[dict[str, Any]]:
    """Records as flat rows for a Hub dataset (the step tree as JSON text: its nodes vary in shape)."""
    rows = []
    for r in records:
        row = r.to_dict()
        row["tree"] = json.dumps(row["tree"], ensure_ascii=False)
        rows.append(row)
    return rows


def hub_config_name(recipe: Recipe) -> str:
    return f"{names.run_name(recipe)}--{recipe.search_key}"


def push_to_hub(result: MergeResult) -> str:
    """Upload the merged records as a dataset config of `hub_dataset_id`; returns the config name.
    An existing config is kept unless `overwrite_hub_revision`."""
    import datasets
    from huggingface_hub import HfApi

    recipe = result.recipe
    if not recipe.hub_dataset_id:
        raise MergeError("--push-to-hub needs hub_dataset_id (org/name): --set hub_dataset_id=org/name")
    config = hub_config_name(recipe)
    api = HfApi()
    if not recipe.overwrite_hub_revision and api.repo_exists(recipe.hub_dataset_id, repo_type="dataset"):
        files = api.list_repo_files(recipe.hub_dataset_id, repo_type="dataset")
        if any(f.startswith(f"{config}/") for f in files):
            raise MergeError(f"hub_dataset_id={recipe.hub_dataset_id!r} already has config {config!r}; "
                             f"set overwrite_hub_revision=true to replace it")
    ds = datasets.Dataset.from_list(hub_rows(result.records))
    log.info("pushing %d records to %s (config %s)", len(ds), recipe.hub_dataset_id, config)
    ds.push_to_hub(recipe.hub_dataset_id, config_name=config, private=recipe.hub_dataset_private)
    return config
