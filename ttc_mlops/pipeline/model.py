"""The registered model: each evaluated configuration a version, loadable as a pyfunc that solves problems.

    python -c "import mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model('models:/ttc-SmolLM2-135M-Instruct-best_of_n@best'); print(m.predict(pd.DataFrame({'problem': ['What is 2+3?']})))"

`ttc evaluate` registers every evaluated configuration as a version of the registered model
`ttc-<policy model>-<strategy>` (`register_version`); the version holds the recipe, and loading it
builds the recipe's policy and PRM (the embedded model when the recipe names it) on the first
`predict`. The `best` alias follows the version with the highest primary accuracy among the versions
graded on one problem set (the largest one: 1 problem right of 1 does not beat 1 of 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd

from .. import names
from ..config import Recipe, recipe_yaml
from . import store

log = logging.getLogger(__name__)


with warnings.catch_warnings():
    # MLflow reads a DataFrame type hint as "Any" and warns on every import; the model's signature is
    # given explicitly at registration, so there is nothing for it to infer.
    warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)

    class TTCSearchModel(mlflow.pyfunc.PythonModel):
        """Input: a DataFrame with a `problem` column. Output: per problem the answer, the chosen
        completion and its aggregated score."""

        def load_context(self, context) -> None:
            from ..config import load_recipe

            self.recipe = load_recipe(context.artifacts["recipe"])
            self._policy = self._prm = None

        def _models(self):
            if self._policy is None:
                from ..policy import load_policy
                from ..prm import load_prm

                self._policy, self._prm = load_policy(self.recipe.policy_settings), load_prm(self.recipe.prm_settings)
            return self._policy, self._prm

        def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
            from ..data import Problem
            from ..runner import run_search

            if "problem" not in getattr(model_input, "columns", ()):
                raise ValueError(f"model_input must be a DataFrame with a 'problem' column, got columns "
                                 f"{list(getattr(model_input, 'columns', []))}")
            texts = [str(t) for t in model_input["problem"]]
            # an id from the text, so a problem's samples are the same whichever batch it comes in
            problems = [Problem("predict/" + hashlib.sha256(t.encode()).hexdigest()[:12], t, None) for t in texts]
            policy, prm = self._models()
            # the core's run loop, as a chunk run searches: batches, each from empty caches
            records = run_search(self.recipe, problems, policy, prm)
            return pd.DataFrame({
                "problem": texts,
                "answer": [r.pred for r in records],
                "completion": [r.completions[r.selected] if r.selected is not None else None for r in records],
                "score": [float(r.agg_scores[r.selected]) if r.selected is not None else float("nan") for r in records],
            })


class VersionRefused(ValueError):
    """A registered version that `load_search` will not build: it would run code, or its recipe is not
    the one registered."""


def load_search(model_uri: str, allow_code: bool = False) -> "TTCSearchModel":
    """A registered version as a search built from its recipe alone (data, never code): where others
    can write to the tracking server, `mlflow.pyfunc.load_model` would run the version's loader file,
    an artifact like any other; this reads only `recipe.yaml` and builds the search from this package.
    `load_search(uri).predict(None, pd.DataFrame({"problem": [...]}))`.

    The recipe must be the one the version's tags recorded at registration, and may not ask for code
    (`trust_remote_code: true`, or a local model folder that ships Python) unless `allow_code=True`:
    pass that only where whoever can write to the store may run code on this machine."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from ..config import load_recipe

    name, number = get_model_name_and_version(store.client(), model_uri)
    version = store.client().get_model_version(name, number)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/artifacts/{names.RECIPE_ARTIFACT}", dst_path=tmp)
        text = Path(local).read_text()
        model = TTCSearchModel()
        model.recipe = load_recipe(local)
    where = f"{model_uri} (version {number} of {name})"
    recorded = version.tags.get("recipe")
    if recorded is None:
        raise VersionRefused(f"{where} has no `recipe` tag to check its recipe.yaml against (registered before "
                             f"tags held it?): run `ttc evaluate --parent-run-id {version.run_id}` to register it again")
    if text[:MAX_TAG_CHARS] != recorded:
        at = next((i for i, (a, b) in enumerate(zip(text, recorded)) if a != b), min(len(text), len(recorded)))
        line = text[:at].count("\n") + 1
        raise VersionRefused(f"{where}: its recipe.yaml is not the recipe registered (the `recipe` tag differs from "
                             f"line {line}): the artifact was changed after registration; not loaded")
    if not allow_code:
        asking = remote_code(model.recipe)
        if asking:
            raise VersionRefused(f"{where} would run code: {'; '.join(asking)}. load_search(uri, allow_code=True) "
                                 f"only if everyone who can write to this tracking store may run code here")
    model._policy = model._prm = None
    return model


def remote_code(recipe: Recipe) -> list[str]:
    """What in a recipe would run Python that is not this package's (empty: nothing)."""
    found = []
    if recipe.trust_remote_code:
        found.append("trust_remote_code: true runs the Python its models ship")
    for field in ("model_path", "prm_path"):
        folder = Path(getattr(recipe, field)).expanduser()
        if not folder.is_dir():
            continue  # the embedded model or a Hub id: without trust_remote_code transformers runs no model code
        py = sorted(p.name for p in folder.glob("*.py"))
        try:
            auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            auto_map = None
        if py or auto_map:
            found.append(f"{field}={str(folder)!r} ships Python ({', '.join(py) or 'config.json auto_map'})")
    return found


MAX_TAG_CHARS = 5000  # MLflow's limit on a model version tag value
MODEL_CODE = Path(__file__).with_name("registered_model.py")


def register_version(parent_id: str, recipe: Recipe, metrics: dict[str, float],
                     primary: str) -> tuple[str, str, bool, str | None]:
    """Log the pyfunc model on the parent and register it as a version of the (model, strategy)
    registered model; move the `best` alias to the best version by `primary`. Returns (name,
    version, created, the version `best` points to or None). A parent registered before is not
    registered again."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    c = store.client()
    name = names.registered_model_name(recipe)
    try:
        c.create_registered_model(name, tags={names.TAG_MODEL: recipe.model_path, names.TAG_STRATEGY: recipe.approach},
                                  description=f"{recipe.approach} over {recipe.model_path}; one version per evaluated configuration")
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    done = _versions_of(name, parent_id)
    if done:
        return name, str(done[0].version), False, update_best_alias(name, primary)
    yaml_text = recipe_yaml(recipe)
    signature = ModelSignature(inputs=Schema([ColSpec("string", "problem")]),
                               outputs=Schema([ColSpec("string", "problem"), ColSpec("string", "answer"),
                                               ColSpec("string", "completion"), ColSpec("double", "score")]))
    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / names.RECIPE_ARTIFACT
        recipe_file.write_text(yaml_text)
        model_dir = Path(tmp) / names.MODEL_ARTIFACT
        # models from code: the version holds this package's loader file and the recipe, never a pickle
        mlflow.pyfunc.save_model(str(model_dir), python_model=str(MODEL_CODE), artifacts={"recipe": str(recipe_file)},
                                 signature=signature, input_example=pd.DataFrame({"problem": ["What is $2 + 3$?"]}),
                                 pip_requirements=[f"mlflow=={mlflow.__version__}", "ttc_mlops"])
        c.log_artifacts(parent_id, str(model_dir), names.MODEL_ARTIFACT)
    parent = c.get_run(parent_id)
    source = f"{parent.info.artifact_uri}/{names.MODEL_ARTIFACT}"
    tags = {"recipe": yaml_text[:MAX_TAG_CHARS], names.TAG_SEARCH_KEY: recipe.search_key, names.TAG_PRM: recipe.prm_path,
            names.TAG_N: str(recipe.n), names.TAG_DATASET: recipe.dataset_name, "agg_strategy": recipe.agg_strategy,
            **_problem_set_tags(store.problem_set(parent)),
            **{k: f"{v:.6g}" for k, v in metrics.items() if v is not None}}
    mv = c.create_model_version(name, source, run_id=parent_id, tags=tags,
                                description=f"{names.run_name(recipe)} on {recipe.dataset_name} (PRM {recipe.prm_path}, N={recipe.n})")
    # Two evaluations of one parent at once both found no version and both created one: the first
    # created (the lowest number) stays, the others are deleted by whoever made them. A version is
    # numbered when it is created, so the later creator always sees the earlier one here.
    first = _versions_of(name, parent_id)[0]
    if str(first.version) != str(mv.version):
        log.warning("parent %s was registered at the same time by another process as version %s: version %s "
                    "removed", parent_id, first.version, mv.version)
        c.delete_model_version(name, mv.version)
        return name, str(first.version), False, update_best_alias(name, primary)
    return name, str(mv.version), True, update_best_alias(name, primary)


def _problem_set_tags(ps) -> dict[str, str]:
    """A version's record of the problems it was graded on (read where its run is gone)."""
    return {names.TAG_PROBLEM_SET: ps.digest, names.TAG_MERGED_PROBLEMS: str(ps.problems)} if ps.digest != "?" else {}


def _versions_of(name: str, parent_id: str) -> list:
    """The versions of `name` registered from run `parent_id`, the oldest first."""
    found = [v for v in store.client().search_model_versions(f"name = '{name}'") if v.run_id == parent_id]
    return sorted(found, key=lambda v: int(v.version))


def update_best_alias(name: str, primary: str) -> str | None:
    """Point `best` at the version with the highest `primary` metric tag (the older one on a tie)
    among the versions graded on one problem set: the one with the most problems (on a tie, the newest
    version's). Accuracies of different problem sets are not compared (`ttc compare` refuses them too).
    A version that got nothing right is never `best`: while none did, the alias is not set."""
    c = store.client()
    versions = [v for v in c.search_model_versions(f"name = '{name}'") if primary in v.tags]

    runs: dict[str, tuple[int, str]] = {}

    def problem_set(v) -> tuple[int, str]:
        """The problems its run graded, decided as `ttc compare` decides it (`store.problem_set`: the
        logged dataset, else the run's tags); a version whose run is gone, by the tags it was registered with."""
        if v.run_id not in runs:
            try:
                runs[v.run_id] = store.problem_set(c.get_run(v.run_id)).key
            except mlflow.exceptions.MlflowException:
                runs[v.run_id] = store.tagged_problem_set(v.tags).key
        return runs[v.run_id]

    if versions:
        chosen = problem_set(max(versions, key=lambda v: (problem_set(v)[0], int(v.version))))
        others = len({problem_set(v) for v in versions}) - 1
        if others:
            log.info("%s: %s compared among the versions graded on %d problems (set %s); %d other problem set(s) "
                     "left out", name, names.BEST_ALIAS, chosen[0], chosen[1], others)
        versions = [v for v in versions if problem_set(v) == chosen]
    scored = [(float(v.tags[primary]), -int(v.version), v.version) for v in versions]
    if not scored or max(scored)[0] <= 0:
        log.info("no version of %s has %s above 0: alias %r not set", name, primary, names.BEST_ALIAS)
        return None
    best = max(scored)[2]
    c.set_registered_model_alias(name, names.BEST_ALIAS, str(best))
    return str(best)
