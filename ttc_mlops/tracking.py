"""The only module that talks to MLflow: run layout, names of params, tags, metrics and artifacts.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python -c "import ttc_mlops.tracking as t; print(t.TAG_ROLE)"

Layout. One experiment per benchmark. A *parent* run per search configuration (the recipe minus
its chunk fields, hashed into the tag `ttc.search_key`); one *chunk* child run per slice of the
problems, linked by `mlflow.parentRunId`. Chunk runs hold their records under `records/`; merge
writes `records/merged.jsonl.gz` on the parent, evaluate logs the accuracy metrics there.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .config import Recipe, recipe_yaml
from .records import Record, read_records, write_records

log = logging.getLogger(__name__)

# tags
TAG_ROLE = "ttc.role"  # "parent" | "chunk"
TAG_SEARCH_KEY = "ttc.search_key"
TAG_STRATEGY = "ttc.strategy"
TAG_MODEL = "ttc.model"
TAG_PRM = "ttc.prm"
TAG_DATASET = "ttc.dataset"
TAG_N = "ttc.n"
TAG_ROWS = "ttc.rows"  # "start:end", the chunk's rows of the problem set (its identity)
TAG_PROBLEMS = "ttc.problems"  # problems in the chunk
TAG_TOTAL = "ttc.total_problems"  # problems in the whole set
TAG_MERGED = "ttc.merged"  # "complete" | "partial"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"

# artifacts
RECORDS_DIR = "records"
MERGED_RECORDS = "merged.jsonl.gz"
RECIPE_ARTIFACT = "recipe.yaml"

# metrics of a chunk run
M_PROBLEMS = "problems"
M_COMPLETION_TOKENS = "completion_tokens"
M_TOKENS_PER_S = "tokens_per_s"
M_WALL_S = "wall_s"
M_ACC_SELECTED = "acc_selected"
M_UNGRADED = "ungraded"  # problems whose gold answer could not be parsed

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value; the full recipe is the YAML artifact


def chunk_artifact(start: int, end: int) -> str:
    return f"chunk-{start:05d}-{end:05d}.jsonl.gz"


def client() -> MlflowClient:
    return MlflowClient()


def experiment_name(recipe: Recipe) -> str:
    return recipe.experiment_name or f"ttc-{recipe.dataset_label}"


def ensure_experiment(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # created by a concurrent chunk meanwhile
        return c.get_experiment_by_name(name).experiment_id


def recipe_params(recipe: Recipe) -> list[Param]:
    params = []
    for key, value in recipe.model_dump().items():
        text = "" if value is None else str(value)
        params.append(Param(key, text[: MAX_PARAM_CHARS - 3] + "..." if len(text) > MAX_PARAM_CHARS else text))
    return params


def config_tags(recipe: Recipe) -> dict[str, str]:
    return {
        TAG_SEARCH_KEY: recipe.search_key,
        TAG_STRATEGY: recipe.approach,
        TAG_MODEL: recipe.model_path,
        TAG_PRM: recipe.prm_path,
        TAG_DATASET: recipe.dataset_name,
        TAG_N: str(recipe.n),
    }


def _parents(experiment_id: str, key: str) -> list:
    runs = client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_SEARCH_KEY}` = '{key}' and tags.`{TAG_ROLE}` = 'parent'",
        max_results=50,
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def _log_config(run_id: str, recipe: Recipe, extra_tags: dict[str, str]) -> None:
    c = client()
    existing = c.get_run(run_id).data.params
    params = [p for p in recipe_params(recipe.model_copy(update={k: None for k in ("chunk", "num_chunks")}))
              if p.key not in existing]
    tags = [RunTag(k, v) for k, v in {**config_tags(recipe), **extra_tags}.items()]
    c.log_batch(run_id, params=params, tags=tags)


def find_or_create_parent(recipe: Recipe, experiment_id: str) -> str:
    """The parent run of this search configuration: the explicit `parent_run_id`, the run that
    `mlflow run` started (MLFLOW_RUN_ID), or the oldest parent tagged with the same search key.
    Two chunks that start at once may both create one; both then keep the oldest and the other
    is deleted, so they converge on one parent."""
    c = client()
    if recipe.parent_run_id:
        run = c.get_run(recipe.parent_run_id)  # raises with the id named if it does not exist
        key = run.data.tags.get(TAG_SEARCH_KEY)
        if key is not None and key != recipe.search_key:
            raise ValueError(f"parent_run_id={recipe.parent_run_id} belongs to another search configuration "
                             f"(search key {key}, this recipe's is {recipe.search_key})")
        if key is None:
            _log_config(run.info.run_id, recipe, {TAG_ROLE: "parent"})
        return run.info.run_id
    launched = os.environ.get("MLFLOW_RUN_ID")
    if launched:
        run = c.get_run(launched)
        if run.data.tags.get(TAG_ROLE) in (None, "parent") and run.data.tags.get(TAG_SEARCH_KEY) in (None, recipe.search_key):
            _log_config(launched, recipe, {TAG_ROLE: "parent", TAG_RUN_NAME: run_name(recipe)})
            return launched
    found = _parents(experiment_id, recipe.search_key)
    if found:
        return found[0].info.run_id
    run = c.create_run(experiment_id, tags={TAG_ROLE: "parent", TAG_RUN_NAME: run_name(recipe), **config_tags(recipe)})
    _log_config(run.info.run_id, recipe, {})
    c.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(0.2)  # let a concurrent creator's run become visible before choosing
    winner = _parents(experiment_id, recipe.search_key)[0].info.run_id
    if winner != run.info.run_id:
        c.delete_run(run.info.run_id)
    return winner


def run_name(recipe: Recipe) -> str:
    return f"{recipe.model_label}-{recipe.approach}-n{recipe.n}" + (
        f"-m{recipe.beam_width}" if recipe.approach != "best_of_n" else "")


def chunk_runs(parent_id: str) -> list:
    c = client()
    experiment_id = c.get_run(parent_id).info.experiment_id
    return c.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}' and tags.`{TAG_ROLE}` = 'chunk'",
                         max_results=10000)


def find_chunk_run(parent_id: str, start: int, end: int):
    """The chunk run of rows [start, end), preferring a finished one."""
    found = [r for r in chunk_runs(parent_id) if r.data.tags.get(TAG_ROWS) == f"{start}:{end}"]
    found.sort(key=lambda r: (r.info.status != "FINISHED", r.info.start_time))
    return found[0] if found else None


def create_chunk_run(parent_id: str, recipe: Recipe, start: int, end: int, total: int) -> str:
    c = client()
    parent = c.get_run(parent_id)
    tags = {TAG_ROLE: "chunk", TAG_PARENT: parent_id, TAG_ROWS: f"{start}:{end}", TAG_PROBLEMS: str(end - start),
            TAG_TOTAL: str(total), TAG_RUN_NAME: f"rows-{start:05d}-{end:05d}", **config_tags(recipe)}
    run = c.create_run(parent.info.experiment_id, tags=tags)
    c.log_batch(run.info.run_id, params=recipe_params(recipe))
    log_text(run.info.run_id, recipe_yaml(recipe), RECIPE_ARTIFACT)
    return run.info.run_id


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_records(run_id: str, records: list[Record], name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_records(records, Path(tmp) / name)
        client().log_artifact(run_id, str(path), RECORDS_DIR)


def load_records(run_id: str, name: str) -> list[Record] | None:
    """The run's records artifact, or None where the run has none."""
    c = client()
    names = {Path(f.path).name for f in c.list_artifacts(run_id, RECORDS_DIR)}
    if name not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = c.download_artifacts(run_id, f"{RECORDS_DIR}/{name}", tmp)
        return read_records(Path(local))


def log_metrics(run_id: str, values: dict[str, float], step: int = 0) -> None:
    """All in one request (a tracking server is not hit once per number)."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client().log_batch(run_id, metrics=metrics[start : start + 1000])


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def set_status(run_id: str, status: str) -> None:
    client().set_terminated(run_id, status)


def reopen(run_id: str) -> None:
    client().update_run(run_id, status="RUNNING")


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


# --- merge, evaluate, registry and compare (the parent run's side) ---------------------------

TAG_MERGED_PROBLEMS = "ttc.merged_problems"  # problems in the merged records
TAG_MERGED_DIGEST = "ttc.merged_digest"  # sha256 of the merged records (what evaluate graded)
TAG_EVALUATED = "ttc.evaluated"  # the merged digest that evaluate's metrics belong to
TAG_GROUP = "ttc.group"  # "<model>/<strategy>": group-by key for the mlflow ui chart view
TAG_REGISTERED = "ttc.registered"  # "<registered model>/<version>"
ROLE_COMPARE = "compare"  # a run that holds a comparison figure of an experiment
ROLE_STEP = "step"  # the run `mlflow run -e merge|evaluate` starts, nested under the parent

EVAL_TABLE = "eval/accuracy.json"
EVAL_PLOT = "eval/accuracy.png"
COMPARE_TABLE = "compare/accuracy.json"
COMPARE_PLOT = "compare/accuracy.png"
MODEL_ARTIFACT = "model"
BEST_ALIAS = "best"

# evaluate's metrics, logged on the parent with step = n
M_ACC_NAIVE = "acc_naive"  # the completion with the highest aggregated score
M_ACC_WEIGHTED = "acc_weighted"  # equivalent answers pooled, aggregated scores summed
M_ACC_MAJ = "acc_maj"  # the most frequent answer
M_PASS = "pass"  # any of the n completions is correct (pass@n)
VOTING_METRICS = (M_ACC_NAIVE, M_ACC_WEIGHTED, M_ACC_MAJ, M_PASS)
M_EVAL_PROBLEMS = "eval_problems"  # problems with a gold answer, at step = n


def level_metric(metric: str, level: int) -> str:
    return f"{metric}_level_{level}"


def get_run(run_id: str):
    try:
        return client().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise LookupError(f"parent_run_id={run_id!r}: no such run in {tracking_uri()} ({err.message.splitlines()[0]})") from None


def find_parent(recipe: Recipe):
    """The parent run of this configuration (never creates one)."""
    name = experiment_name(recipe)
    exp = client().get_experiment_by_name(name)
    found = _parents(exp.experiment_id, recipe.search_key) if exp is not None else []
    if not found:
        raise LookupError(f"no parent run with {TAG_SEARCH_KEY}={recipe.search_key} in experiment {name!r} "
                          f"({tracking_uri()}): run the recipe first (`ttc run`)")
    return found[0]


def load_run_text(run_id: str, artifact_file: str) -> str | None:
    """A text artifact of a run, or None where it has none."""
    c = client()
    parent_dir = str(Path(artifact_file).parent) if "/" in artifact_file else None
    names = {f.path for f in c.list_artifacts(run_id, parent_dir)}
    if artifact_file not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(c.download_artifacts(run_id, artifact_file, tmp)).read_text()


def adopt_launched_run(parent_id: str, role: str) -> None:
    """`mlflow run -e merge|evaluate` starts a run of its own: nest it under the parent it works on."""
    launched = os.environ.get("MLFLOW_RUN_ID")
    if launched and launched != parent_id:
        set_tags(launched, {TAG_ROLE: role, TAG_PARENT: parent_id})


def log_table(run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    import pandas as pd

    client().log_table(run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)


def log_figure(run_id: str, figure, artifact_file: str) -> None:
    client().log_figure(run_id, figure, artifact_file)


def log_step_metrics(run_id: str, per_step: dict[int, dict[str, float]]) -> None:
    """Metrics with step = n, all in batches."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for step, values in per_step.items() for k, v in values.items() if v is not None]
    for start in range(0, len(metrics), 1000):
        client().log_batch(run_id, metrics=metrics[start : start + 1000])


def evaluated_parents(experiment: str, model: str | None = None) -> list:
    """Evaluated parent runs of an experiment, optionally of one policy model (path or label)."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in c.search_experiments())
        raise LookupError(f"experiment={experiment!r} does not exist in {tracking_uri()} (experiments: {names})")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'parent'", max_results=10000)
    runs = [r for r in runs if TAG_EVALUATED in r.data.tags]
    if model is not None:
        runs = [r for r in runs if model in (r.data.tags.get(TAG_MODEL), model_label_of(r.data.tags.get(TAG_MODEL, "")))]
    return runs


def model_label_of(model_path: str) -> str:
    return model_path.rstrip("/").split("/")[-1].split(":")[-1]


def metric_steps(run_id: str, key: str) -> dict[int, float]:
    """step -> the latest value logged at that step."""
    history = sorted(client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def experiments_with_parents() -> list[str]:
    c = client()
    names = []
    for exp in c.search_experiments():
        if c.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'parent'", max_results=1):
            names.append(exp.name)
    return sorted(names)


def create_compare_run(experiment: str, tags: dict[str, str]) -> str:
    exp_id = ensure_experiment(experiment)
    run = client().create_run(exp_id, tags={TAG_ROLE: ROLE_COMPARE, TAG_RUN_NAME: "compare", **tags})
    return run.info.run_id


# --- registry ---

def registered_model_name(recipe: Recipe) -> str:
    """One registered model per (policy model, strategy)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"ttc-{recipe.model_label}-{recipe.approach}")


MAX_TAG_CHARS = 5000  # MLflow's limit on a model version tag value


def register_version(parent_id: str, recipe: Recipe, metrics: dict[str, float], primary: str) -> tuple[str, str, bool]:
    """Log the pyfunc model on the parent and register it as a version of the (model, strategy)
    registered model; move the `best` alias to the best version by `primary`.
    Returns (name, version, created). A parent that was registered before is not registered again."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from .registry import TTCSearchModel

    c = client()
    name = registered_model_name(recipe)
    try:
        c.create_registered_model(name, tags={TAG_MODEL: recipe.model_path, TAG_STRATEGY: recipe.approach},
                                  description=f"{recipe.approach} over {recipe.model_path}; one version per evaluated configuration")
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    done = [v for v in c.search_model_versions(f"name = '{name}'") if v.run_id == parent_id]
    if done:
        version = done[0].version
        update_best_alias(name, primary)
        return name, str(version), False
    yaml_text = recipe_yaml(recipe)
    signature = ModelSignature(inputs=Schema([ColSpec("string", "problem")]),
                               outputs=Schema([ColSpec("string", "problem"), ColSpec("string", "answer"),
                                               ColSpec("string", "completion"), ColSpec("double", "score")]))
    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / RECIPE_ARTIFACT
        recipe_file.write_text(yaml_text)
        model_dir = Path(tmp) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(str(model_dir), python_model=TTCSearchModel(), artifacts={"recipe": str(recipe_file)},
                                 signature=signature, pip_requirements=[f"mlflow=={mlflow.__version__}", "ttc_mlops"])
        c.log_artifacts(parent_id, str(model_dir), MODEL_ARTIFACT)
    source = f"{c.get_run(parent_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    tags = {"recipe": yaml_text[:MAX_TAG_CHARS], TAG_SEARCH_KEY: recipe.search_key, TAG_PRM: recipe.prm_path,
            TAG_N: str(recipe.n), TAG_DATASET: recipe.dataset_name, "agg_strategy": recipe.agg_strategy,
            **{k: f"{v:.6g}" for k, v in metrics.items() if v is not None}}
    mv = c.create_model_version(name, source, run_id=parent_id, tags=tags,
                                description=f"{run_name(recipe)} on {recipe.dataset_name} (PRM {recipe.prm_path}, N={recipe.n})")
    update_best_alias(name, primary)
    return name, str(mv.version), True


def update_best_alias(name: str, primary: str) -> str | None:
    """Point `best` at the version with the highest `primary` metric tag (the older one on a tie)."""
    c = client()
    scored = [(float(v.tags[primary]), -int(v.version), v.version) for v in c.search_model_versions(f"name = '{name}'")
              if primary in v.tags]
    if not scored:
        return None
    best = max(scored)[2]
    c.set_registered_model_alias(name, BEST_ALIAS, str(best))
    return str(best)


def model_version_by_alias(name: str, alias: str = BEST_ALIAS):
    return client().get_model_version_by_alias(name, alias)


def load_pyfunc(model_uri: str):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)
