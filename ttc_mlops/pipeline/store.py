"""The tracking store: find or create parent and chunk runs, log to them, read their records back.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python -c "from ttc_mlops.pipeline import store; print(store.tracking_uri())"

Every call goes through one `MlflowClient` of the current tracking URI; names of tags, metrics and
artifacts come from `ttc_mlops.names` (the run layout is described there).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .. import names
from ..config import Recipe, RecipeError, recipe_yaml
from ..records import Record, read_records_tolerant, write_records

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value; the full recipe is the YAML artifact
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch


_READY: set[str] = set()  # tracking URIs this process has opened once


# How long a writer waits for a concurrent writer's run or tag to become visible before it reads
# back who won (a parent's creation, a chunk's lease): processes racing on one store, as
# tests/test_faults.py starts them.
SETTLE_S = 0.2


_CLIENTS: dict[tuple[str, str], MlflowClient] = {}  # (tracking URI, registry URI) -> its client


def client() -> MlflowClient:
    """The client of the current tracking (and registry) URI, made once per URI in this process:
    making one resolves its stores again (milliseconds; a merge or evaluate asks hundreds of times).
    Credentials are read from the environment at each request, not here."""
    uri = tracking_uri()
    key = (uri, mlflow.get_registry_uri())
    made = _CLIENTS.get(key)
    if made is None:
        if uri not in _READY:
            _open_store(uri)
            _READY.add(uri)
        while len(_CLIENTS) >= 8:  # a process that moves between stores (a test session) keeps the latest few
            _CLIENTS.pop(next(iter(_CLIENTS)))
        made = _CLIENTS[key] = MlflowClient()
    return made


class _Fixed(NamedTuple):
    experiment_id: str
    artifact_uri: str


_FIXED: dict[tuple[str, str], _Fixed] = {}  # (tracking URI, run id) -> what a run never changes


def fixed(run_id: str) -> _Fixed:
    """A run's experiment and artifact root, read once per process: neither changes after the run is
    created, and each read is a round trip to the store (to the server, on a cluster)."""
    key = (tracking_uri(), run_id)
    if key not in _FIXED:
        info = client().get_run(run_id).info
        _FIXED[key] = _Fixed(info.experiment_id, info.artifact_uri)
    return _FIXED[key]


def _remember(run) -> None:
    _FIXED[(tracking_uri(), run.info.run_id)] = _Fixed(run.info.experiment_id, run.info.artifact_uri)


def _artifact_uri(run_id: str, path: str | None = None) -> str:
    """Where a run's artifact `path` (its root by default) lives, from the run's root read once
    (`client().list_artifacts` / `download_artifacts` read the run first, each time)."""
    root = fixed(run_id).artifact_uri.rstrip("/")
    return f"{root}/{path}" if path else root


def list_artifact_names(run_id: str, folder: str | None = None) -> set[str]:
    """The file and folder names directly in a run's artifact `folder` (its root by default)."""
    found = mlflow.artifacts.list_artifacts(artifact_uri=_artifact_uri(run_id, folder), tracking_uri=tracking_uri())
    return {Path(f.path).name for f in found}


def download_artifact(run_id: str, path: str, dst: str) -> str:
    """One artifact of a run into `dst`; its local path."""
    return mlflow.artifacts.download_artifacts(artifact_uri=_artifact_uri(run_id, path), dst_path=dst,
                                               tracking_uri=tracking_uri())


def _open_store(uri: str) -> None:
    """Open a SQLite store for the first time under a file lock beside the database: creating one
    runs MLflow's schema migrations, and processes that run them at once collide (a lost chunk, or a
    store left with `_alembic_tmp_*` tables for good). Whoever comes second finds it migrated."""
    if not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock

    path = Path(uri.removeprefix("sqlite:///"))
    if str(path) in ("", ":memory:"):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=600):
        c = MlflowClient(uri)
        c.search_experiments(max_results=1)  # the tracking tables
        c.search_registered_models(max_results=1)  # the registry's


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


REACH_TRIES, REACH_TIMEOUT_S = 3, 3  # a server that answers none of 3 tries of 3 s is reported, not waited for


class StoreError(RuntimeError):
    """The tracking store cannot be used: the message says what failed and what to do."""

    def __init__(self, message: str, reachable: bool = True):
        super().__init__(message)
        self.reachable = reachable  # False: nothing more should be sent there (each call would retry for minutes)


def check_tracking(uri: str | None = None) -> None:
    """Raise StoreError within seconds where the tracking store cannot be used: a server that does not
    answer (REACH_TRIES tries of REACH_TIMEOUT_S s, where MLflow's own client retries for minutes) or
    refuses this process's credentials, a SQLite database whose file or folder cannot be written."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if str(path) in ("", ":memory:"):
            return
        target = path if path.exists() else next(p for p in (path.parent, *path.parent.parents) if p.exists())
        if not os.access(target, os.W_OK):
            raise StoreError(f"tracking store {uri}: {target} cannot be written (as uid {os.getuid()}): make it "
                             f"writable, or point MLFLOW_TRACKING_URI at a store that is")


def _check_server(uri: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    reply, last = None, None
    for attempt in range(REACH_TRIES):
        try:
            reply = http_request(creds, "/api/2.0/mlflow/experiments/search", "POST", max_retries=0,
                                 timeout=REACH_TIMEOUT_S, raise_on_status=False, json={"max_results": 1})
            break
        except Exception as err:  # requests' ConnectionError / Timeout, as MLflow wraps them
            last = err
            if attempt + 1 < REACH_TRIES:
                time.sleep(1)
    if reply is None:
        raise StoreError(f"tracking server {uri} did not answer ({REACH_TRIES} tries of {REACH_TIMEOUT_S} s; "
                         f"{_reason(last)}): start it, or point MLFLOW_TRACKING_URI at one that runs", reachable=False)
    if reply.status_code in (401, 403):
        raise StoreError(_auth_message(uri, reply.status_code))
    if reply.status_code >= 400:
        raise StoreError(f"tracking server {uri} answered HTTP {reply.status_code} to a search "
                         f"({' '.join(reply.text.split())[:200]}): is MLFLOW_TRACKING_URI an MLflow tracking server?")


def _auth_message(uri: str, status: int) -> str:
    given = [k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN") if os.environ.get(k)]
    if status == 403:
        return (f"tracking server {uri} refused the request (HTTP 403: user {os.environ.get('MLFLOW_TRACKING_USERNAME')!r} "
                f"may not do this): ask its admin for the permission, or use another user")
    what = f"refused the credentials in {' / '.join(given)}" if given else "needs credentials and none were given"
    return (f"tracking server {uri} {what} (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            f"(or MLFLOW_TRACKING_TOKEN) to an account of that server")


def _reason(err: BaseException | None) -> str:
    """The innermost cause of a connection failure, on one short line."""
    text = " ".join(str(err).split())
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                   "Temporary failure in name resolution", "Network is unreachable"):
        if marker in text:
            return marker
    return text[:200]


def describe_failure(err: BaseException) -> tuple[str, bool] | None:
    """(one line saying what failed in the store or on the disk and what to do, whether the store can
    still be written) for a failure that is not the recipe's; None for anything else."""
    import errno

    uri = tracking_uri()
    seen, chain = set(), []
    while err is not None and id(err) not in seen:  # the OSError is often the cause of MLflow's error
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, StoreError):
            return str(e), e.reachable
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            return (f"no space left on the device{where} ({e.strerror}): free space there, or point "
                    f"MLFLOW_TRACKING_URI / output_dir at another disk, then run the same command again"), False
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return (f"cannot write {e.filename or 'a file'} ({e.strerror}): make it writable, or point "
                    f"MLFLOW_TRACKING_URI / output_dir elsewhere"), True
    text = " ".join(" ".join(str(e) for e in chain).split())
    if "database or disk is full" in text:
        return (f"tracking store {uri}: its disk is full (sqlite: database or disk is full): free space there, or "
                f"point MLFLOW_TRACKING_URI at another disk, then run the same command again"), False
    if "attempt to write a readonly database" in text:
        return (f"tracking store {uri} is read-only (sqlite: attempt to write a readonly database): make the "
                f"file and its folder writable, or point MLFLOW_TRACKING_URI elsewhere"), False
    if uri.startswith(("http://", "https://")):
        status = next((e.get_http_status_code() for e in chain if hasattr(e, "get_http_status_code")), None)
        if status in (401, 403) or " 401 " in f" {text} " and "nauthorized" in text:
            return _auth_message(uri, 403 if status == 403 else 401), True
        if "Max retries exceeded" in text or "ConnectionError" in text or "Connection refused" in text:
            return (f"tracking server {uri} stopped answering ({_reason(chain[0])}, after MLflow's retries: "
                    f"MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7): start it again, then run the same command "
                    f"(what was checkpointed is kept)"), False
    return None


def ensure_experiment(name: str) -> str:
    """The experiment's id, created where missing. Its kind is set for MLflow 3's UI (the tag
    `mlflow.experimentKind`, which the UI reads and its experiment-type selector writes): an
    experiment of runs and accuracy charts, not a GenAI app, so it opens on the runs and their charts
    (with traces logged and no kind, the UI infers GenAI). A kind someone chose in the UI is kept."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            exp = c.get_experiment(c.create_experiment(name, tags={names.TAG_EXPERIMENT_KIND: names.EXPERIMENT_KIND}))
        except mlflow.exceptions.MlflowException:  # created by a concurrent chunk meanwhile
            exp = c.get_experiment_by_name(name)
    if names.TAG_EXPERIMENT_KIND not in exp.tags:  # made before the kind was set, or by hand
        c.set_experiment_tag(exp.experiment_id, names.TAG_EXPERIMENT_KIND, names.EXPERIMENT_KIND)
    return exp.experiment_id


def recipe_params(recipe: Recipe) -> list[Param]:
    """The recipe's fields that apply to its strategy, as MLflow params (the full recipe is the
    run's recipe.yaml)."""
    params = []
    for key, value in recipe.params().items():
        text = "" if value is None else str(value)
        params.append(Param(key, text[: MAX_PARAM_CHARS - 3] + "..." if len(text) > MAX_PARAM_CHARS else text))
    return params


def config_tags(recipe: Recipe) -> dict[str, str]:
    return {
        names.TAG_SEARCH_KEY: recipe.search_key,
        names.TAG_STRATEGY: recipe.approach,
        names.TAG_MODEL: recipe.model_path,
        names.TAG_PRM: recipe.prm_path,
        names.TAG_DATASET: recipe.dataset_name,
        names.TAG_N: str(recipe.n),
    }


# --- experiments: the recipe's, unless `mlflow run --experiment-name` chose another

DEFAULT_EXPERIMENT = "Default"  # where `mlflow run` puts its run when told nothing


def _launched():
    """The run `mlflow run` started for this process, or None."""
    launched = os.environ.get("MLFLOW_RUN_ID")
    return client().get_run(launched) if launched else None


def experiment_for(recipe: Recipe) -> str:
    """The experiment a run of this recipe logs to: the recipe's (`experiment_name`, default
    ttc-<dataset>), or the one `mlflow run --experiment-name` (or MLFLOW_EXPERIMENT_NAME) chose.
    MLflow's own `Default` experiment is never chosen: it only means nobody said."""
    launched = _launched()
    if launched is not None:
        name = client().get_experiment(launched.info.experiment_id).name
        if name != DEFAULT_EXPERIMENT:
            return name
    return names.experiment_name(recipe)


def mark_launched_failed(message: str) -> None:
    """A run `mlflow run` started whose recipe failed before any work: say so in its name and tags
    (a failed `-P set=...` typo is otherwise an unnamed FAILED run)."""
    launched = _launched()
    if launched is not None and launched.data.tags.get(names.TAG_ROLE) is None:
        set_tags(launched.info.run_id, {names.TAG_ROLE: names.ROLE_FAILED, names.TAG_ERROR: message[:MAX_PARAM_CHARS],
                                        names.TAG_RUN_NAME: "failed preflight: " + message.splitlines()[0][:200]})


# --- parent runs

def check_parent_run(recipe: Recipe) -> None:
    """An explicit `parent_run_id` must be a parent run of this configuration: checked before
    anything is written (a chunk run given by mistake would get a chunk nested under it)."""
    if not recipe.parent_run_id:
        return
    try:
        run = client().get_run(recipe.parent_run_id)
    except mlflow.exceptions.MlflowException as err:
        raise RecipeError(f"parent_run_id={recipe.parent_run_id!r}: no such run in {tracking_uri()} "
                          f"({err.message.splitlines()[0]})") from None
    role, key = run.data.tags.get(names.TAG_ROLE), run.data.tags.get(names.TAG_SEARCH_KEY)
    if role not in (None, names.ROLE_PARENT):
        raise RecipeError(f"parent_run_id={recipe.parent_run_id!r} is a {role} run ({names.TAG_ROLE}={role}), not a parent: "
                          f"give the parent's id" + (f" ({run.data.tags[names.TAG_PARENT]})" if names.TAG_PARENT in run.data.tags
                                                      else ""))
    if key is not None and key != recipe.search_key:
        raise RecipeError(f"parent_run_id={recipe.parent_run_id!r} belongs to another search configuration "
                          f"({names.TAG_SEARCH_KEY}={key}; this recipe's is {recipe.search_key}): leave parent_run_id out, "
                          f"or run the recipe that parent was made for")


def _parents(experiment_ids: list[str], key: str) -> list:
    """Parent runs of search key `key` in these experiments, oldest first."""
    runs = client().search_runs(
        experiment_ids,
        filter_string=f"tags.`{names.TAG_SEARCH_KEY}` = '{key}' and tags.`{names.TAG_ROLE}` = '{names.ROLE_PARENT}'",
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


def find_or_create_parent(recipe: Recipe, experiment_id: str, adopt: bool = True) -> str:
    """The parent run of this search configuration: the explicit `parent_run_id`, the run that
    `mlflow run` started (MLFLOW_RUN_ID), or the oldest parent tagged with the same search key.
    Two chunks that start at once may both create one; both then keep the oldest and the other
    is deleted, so they converge on one parent."""
    c = client()
    if recipe.parent_run_id:
        check_parent_run(recipe)  # it exists, is a parent, and of this configuration
        run = c.get_run(recipe.parent_run_id)
        if names.TAG_SEARCH_KEY not in run.data.tags:  # a run made by hand becomes the parent
            _log_config(run.info.run_id, recipe, {names.TAG_ROLE: names.ROLE_PARENT})
        return run.info.run_id
    launched = _launched() if adopt else None
    if launched is not None and launched.data.tags.get(names.TAG_ROLE) in (None, names.ROLE_PARENT) \
            and launched.data.tags.get(names.TAG_SEARCH_KEY) in (None, recipe.search_key):
        if launched.info.experiment_id == experiment_id:
            _log_config(launched.info.run_id, recipe, {names.TAG_ROLE: names.ROLE_PARENT, names.TAG_RUN_NAME: names.run_name(recipe)})
            return launched.info.run_id
        # `mlflow run` put its run in another experiment (Default): it becomes a pointer to the parent
        parent = find_or_create_parent(recipe.model_copy(), experiment_id, adopt=False)
        _point_to(launched, parent, experiment_id, names.run_name(recipe))
        return parent
    found = _parents([experiment_id], recipe.search_key)
    if found:
        return found[0].info.run_id
    run = c.create_run(experiment_id, tags={names.TAG_ROLE: names.ROLE_PARENT, names.TAG_RUN_NAME: names.run_name(recipe),
                                            **config_tags(recipe)})
    _log_config(run.info.run_id, recipe, {})
    c.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(SETTLE_S)  # let a concurrent creator's run become visible before choosing
    winner = _parents([experiment_id], recipe.search_key)[0].info.run_id
    if winner != run.info.run_id:
        c.delete_run(run.info.run_id)
    return winner


def _point_to(launched, parent_id: str, experiment_id: str, name: str) -> None:
    where = client().get_experiment(experiment_id).name
    set_tags(launched.info.run_id, {
        names.TAG_ROLE: names.ROLE_LAUNCHER, names.TAG_POINTS_TO: parent_id, names.TAG_RUN_NAME: f"-> {name} (experiment {where})",
        names.TAG_NOTE: f"`mlflow run` started this run here; the search logs to its parent run {parent_id} in the "
                    f"recipe's experiment {where!r} (experiment id {experiment_id}). Pass `--experiment-name {where}` "
                    f"to `mlflow run` to have no pointer run."})


def find_parent(recipe: Recipe):
    """The parent run of this configuration (never creates one): in the experiment a run of the
    recipe logs to, else the only experiment that has one."""
    name = experiment_for(recipe)
    exp = client().get_experiment_by_name(name)
    found = _parents([exp.experiment_id], recipe.search_key) if exp is not None else []
    if not found:
        found = _parents([e.experiment_id for e in client().search_experiments()], recipe.search_key)
        where = sorted({client().get_experiment(r.info.experiment_id).name for r in found})
        if len(where) > 1:
            raise LookupError(f"no parent run with {names.TAG_SEARCH_KEY}={recipe.search_key} in experiment {name!r}, "
                              f"but one in each of {where}: say which with --set experiment_name=... or --parent-run-id")
    if not found:
        raise LookupError(f"no parent run with {names.TAG_SEARCH_KEY}={recipe.search_key} in experiment {name!r} "
                          f"({tracking_uri()}): run the recipe first (`ttc run`)")
    return found[0]


def get_run(run_id: str):
    try:
        return client().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise LookupError(f"parent_run_id={run_id!r}: no such run in {tracking_uri()} "
                          f"({err.message.splitlines()[0]})") from None


def adopt_launched_run(parent_id: str, step: str) -> None:
    """`mlflow run -e merge|evaluate` starts a run of its own: nest it under the parent it works on,
    named for what it did."""
    launched = os.environ.get("MLFLOW_RUN_ID")
    if launched and launched != parent_id:
        parent_name = get_run(parent_id).data.tags.get(names.TAG_RUN_NAME, parent_id)
        set_tags(launched, {names.TAG_ROLE: names.ROLE_STEP, names.TAG_PARENT: parent_id, names.TAG_RUN_NAME: f"{step}: {parent_name}"})


def evaluated_parents(experiment: str, model: str | None = None) -> list:
    """Evaluated parent runs of an experiment, optionally of one policy model (path or label)."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in c.search_experiments())
        raise LookupError(f"experiment={experiment!r} does not exist in {tracking_uri()} (experiments: {known})")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_PARENT}'",
                         max_results=10000)
    runs = [r for r in runs if names.TAG_EVALUATED in r.data.tags]
    if model is not None:
        runs = [r for r in runs if model in (r.data.tags.get(names.TAG_MODEL), names.model_label_of(r.data.tags.get(names.TAG_MODEL, "")))]
    return runs


def experiments_with_parents() -> list[str]:
    c = client()
    found = []
    for exp in c.search_experiments():
        if c.search_runs([exp.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_PARENT}'", max_results=1):
            found.append(exp.name)
    return sorted(found)


# --- problem sets as MLflow datasets: what the Datasets panel shows, what "the same problems" means

class ProblemSet(NamedTuple):
    name: str  # the recipe's dataset_name (builtin:math500, a Hub id, a file)
    problems: int
    digest: str  # problem_set_digest of the problem ids ("?": unknown, an old run with neither)

    @property
    def key(self) -> tuple[int, str]:
        """What two runs must share to have graded the same problems."""
        return self.problems, self.digest


def problem_dataset(recipe: Recipe, problem_ids: list[str]):
    """The problems as an MLflow dataset entity: name = dataset_name, digest = the problem-set digest
    of these ids (the `ttc.problem_set` tag's), source = the Hub dataset, the file, or this package
    (built-in sets), and a schema of the problem columns. Metadata only: the rows stay where they are."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset
    from mlflow.types import ColSpec, DataType, Schema

    from .. import __version__
    from ..data import is_local_dataset
    from ..records import problem_set_digest

    name = recipe.dataset_name
    if name.startswith("builtin:"):
        source = CodeDatasetSource({"ttc_mlops.builtin": name, "ttc_mlops.version": __version__})
    elif is_local_dataset(name):
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            source = resolve_dataset_source(Path(name).expanduser().resolve().as_uri())
    else:
        source = HuggingFaceDatasetSource(name, config_name=recipe.dataset_config, split=recipe.dataset_split)
    schema = Schema([ColSpec(DataType.string, "problem_id"), ColSpec(DataType.string, "problem"),
                     ColSpec(DataType.string, "answer", required=False), ColSpec(DataType.long, "level", required=False),
                     ColSpec(DataType.string, "subject", required=False)])
    d = MetaDataset(source, name=name, digest=problem_set_digest(problem_ids), schema=schema).to_dict()
    return Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                   schema=d.get("schema"), profile=json.dumps({"num_rows": len(problem_ids)}))


def log_problem_set(run_id: str, recipe: Recipe, problem_ids: list[str], records: str | None = None) -> None:
    """Log the problems a run holds as its input dataset (context "eval"): what `mlflow.log_input`
    does, for a run that is not this process's active one. Logging the same set twice adds nothing.
    `records`: a parent's merged records digest, so the set that was evaluated can be told apart
    from one an earlier (partial) merge logged."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tags = [InputTag(MLFLOW_DATASET_CONTEXT, names.DATASET_CONTEXT), InputTag(names.INPUT_TAG_PROBLEMS, str(len(problem_ids)))]
    if records:
        tags.append(InputTag(names.INPUT_TAG_RECORDS, records))
    client().log_inputs(run_id, datasets=[DatasetInput(problem_dataset(recipe, problem_ids), tags)])


def problem_set(run) -> ProblemSet:
    """Which problems a run graded, the one answer `ttc compare` and the `best` alias both use: its
    logged "eval" dataset (the one logged with the records that were evaluated, where a partial merge
    logged another before), else, for runs from before datasets were logged, its tags
    (`ttc.problem_set`, `ttc.merged_problems`)."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tags = run.data.tags
    found = [(d.dataset, {t.key: t.value for t in d.tags}) for d in (run.inputs.dataset_inputs if run.inputs else [])]
    found = [(dataset, its) for dataset, its in found if its.get(MLFLOW_DATASET_CONTEXT) == names.DATASET_CONTEXT]
    if found:
        graded = tags.get(names.TAG_EVALUATED) or tags.get(names.TAG_MERGED_DIGEST)
        found.sort(key=lambda d: (d[1].get(names.INPUT_TAG_RECORDS) != graded, d[0].digest != tags.get(names.TAG_PROBLEM_SET)))
        dataset, its = found[0]
        problems = its.get(names.INPUT_TAG_PROBLEMS)
        if problems is None and dataset.profile:
            problems = json.loads(dataset.profile).get("num_rows")
        return ProblemSet(dataset.name, int(problems or 0), dataset.digest)
    return tagged_problem_set(tags)


def tagged_problem_set(tags: dict[str, str]) -> ProblemSet:
    """The problem set as tags recorded it (a run or model version from before datasets were logged)."""
    return ProblemSet(tags.get(names.TAG_DATASET, "?"), int(tags.get(names.TAG_MERGED_PROBLEMS, 0) or 0),
                      tags.get(names.TAG_PROBLEM_SET, "?"))


def create_compare_run(experiment: str, tags: dict[str, str]) -> str:
    exp_id = ensure_experiment(experiment)
    run = client().create_run(exp_id, tags={names.TAG_ROLE: names.ROLE_COMPARE, names.TAG_RUN_NAME: "compare", **tags})
    return run.info.run_id


# --- chunk runs

def chunk_runs(parent_id: str) -> list:
    c = client()
    experiment_id = fixed(parent_id).experiment_id
    return c.search_runs([experiment_id], max_results=10000,
                         filter_string=f"tags.`{names.TAG_PARENT}` = '{parent_id}' and tags.`{names.TAG_ROLE}` = '{names.ROLE_CHUNK}'")


def find_chunk_run(parent_id: str, start: int, end: int):
    """The chunk run of rows [start, end), preferring a finished one."""
    found = [r for r in chunk_runs(parent_id) if r.data.tags.get(names.TAG_ROWS) == f"{start}:{end}"]
    found.sort(key=lambda r: (r.info.status != "FINISHED", r.info.start_time))
    return found[0] if found else None


def create_chunk_run(parent_id: str, recipe: Recipe, start: int, end: int, total: int) -> str:
    c = client()
    tags = {names.TAG_ROLE: names.ROLE_CHUNK, names.TAG_PARENT: parent_id, names.TAG_ROWS: f"{start}:{end}",
            names.TAG_PROBLEMS: str(end - start), names.TAG_TOTAL: str(total), names.TAG_RUN_NAME: names.chunk_run_name(start, end),
            **config_tags(recipe)}
    run = c.create_run(fixed(parent_id).experiment_id, tags=tags)
    _remember(run)
    try:
        c.log_batch(run.info.run_id, params=recipe_params(recipe))
        log_text(run.info.run_id, recipe_yaml(recipe), names.RECIPE_ARTIFACT)
    except Exception as err:  # a full disk, a dropped server: the run says why instead of staying RUNNING
        found = describe_failure(err)
        try:
            c.set_tag(run.info.run_id, names.TAG_ERROR, (found[0] if found else repr(err))[:500])
            c.set_terminated(run.info.run_id, "FAILED")
        except Exception:  # the store itself is gone: nothing more can be written
            pass
        raise
    return run.info.run_id


def set_status(run_id: str, status: str) -> None:
    client().set_terminated(run_id, status)


def reopen(run_id: str) -> None:
    client().update_run(run_id, status="RUNNING")


# --- logging and reading back

def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_records(run_id: str, records: list[Record], name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_records(records, Path(tmp) / name)
        client().log_artifact(run_id, str(path), names.RECORDS_DIR)


def load_records(run_id: str, name: str) -> list[Record] | None:
    """The run's records artifact, or None where the run has none; ValueError naming the artifact
    (not a temporary download path) where it is corrupt."""
    records, problem = load_records_tolerant(run_id, name)
    if problem is not None:
        raise ValueError(problem)
    return records


def load_records_tolerant(run_id: str, name: str) -> tuple[list[Record] | None, str | None]:
    """The run's records up to the first unreadable one, and what was wrong (None: nothing)."""
    if name not in list_artifact_names(run_id, names.RECORDS_DIR):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifact(run_id, f"{names.RECORDS_DIR}/{name}", tmp)
        records, problem = read_records_tolerant(Path(local))
    where = f"{names.RECORDS_DIR}/{name} of run {run_id}"
    return records, None if problem is None else f"record file {where} is corrupt at {problem}"


def load_run_text(run_id: str, artifact_file: str) -> str | None:
    """A text artifact of a run, or None where it has none."""
    parent_dir = str(Path(artifact_file).parent) if "/" in artifact_file else None
    if Path(artifact_file).name not in list_artifact_names(run_id, parent_dir):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(download_artifact(run_id, artifact_file, tmp)).read_text()


def log_metrics(run_id: str, values: dict[str, float], step: int = 0) -> None:
    log_step_metrics(run_id, {step: values})


def log_step_metrics(run_id: str, per_step: dict[int, dict[str, float]]) -> None:
    """Metrics with step = n, all in batches (a tracking server is not hit once per number)."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for step, values in per_step.items()
               for k, v in values.items() if v is not None]
    for start in range(0, len(metrics), MAX_BATCH):
        client().log_batch(run_id, metrics=metrics[start : start + MAX_BATCH])


def metric_steps(run_id: str, key: str) -> dict[int, float]:
    """step -> the latest value logged at that step."""
    history = sorted(client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_table(run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    import pandas as pd

    client().log_table(run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)


def log_figure(run_id: str, figure, artifact_file: str) -> None:
    """Log a matplotlib figure, then close it (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    client().log_figure(run_id, figure, artifact_file)
    plt.close(figure)
