"""The registered model: each evaluated configuration a version, loadable as a pyfunc that solves problems.

    python -c "import mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model('models:/ttc-SmolLM2-135M-Instruct-best_of_n@best'); print(m.predict(pd.DataFrame({'problem': ['What is 2+3?']})))"

`ttc evaluate` registers every evaluated configuration as a version of the registered model
`ttc-<policy model>-<strategy>` (`register_version`); the version holds the recipe, and loading it
builds the recipe's policy and PRM (the embedded model when the recipe names it) on the first
`predict`. The `best` alias follows the version with the highest primary accuracy.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd

from .. import names as N
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
            from ..search import STRATEGIES

            if "problem" not in getattr(model_input, "columns", ()):
                raise ValueError(f"model_input must be a DataFrame with a 'problem' column, got columns "
                                 f"{list(getattr(model_input, 'columns', []))}")
            texts = [str(t) for t in model_input["problem"]]
            # an id from the text, so a problem's samples are the same whichever batch it comes in
            problems = [Problem("predict/" + hashlib.sha256(t.encode()).hexdigest()[:12], t, None) for t in texts]
            policy, prm = self._models()
            strategy = STRATEGIES[self.recipe.approach]
            records = []
            size = self.recipe.search_batch_size
            for start in range(0, len(problems), size):
                policy.clear_cache()  # as a chunk run does: a batch's answers do not depend on the batch before
                prm.clear_cache()
                records += strategy(problems[start : start + size], policy, prm, self.recipe)
            return pd.DataFrame({
                "problem": texts,
                "answer": [r.pred for r in records],
                "completion": [r.completions[r.selected] if r.selected is not None else None for r in records],
                "score": [float(r.agg_scores[r.selected]) if r.selected is not None else float("nan") for r in records],
            })


def load_search(model_uri: str) -> "TTCSearchModel":
    """A registered version as a search built from its recipe alone (data, never code): where others
    can write to the tracking server, `mlflow.pyfunc.load_model` would run the version's loader file,
    an artifact like any other; this reads only `recipe.yaml` and builds the search from this package.
    `load_search(uri).predict(None, pd.DataFrame({"problem": [...]}))`."""
    from ..config import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/artifacts/{N.RECIPE_ARTIFACT}", dst_path=tmp)
        model = TTCSearchModel()
        model.recipe = load_recipe(local)
    model._policy = model._prm = None
    return model


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
    name = N.registered_model_name(recipe)
    try:
        c.create_registered_model(name, tags={N.TAG_MODEL: recipe.model_path, N.TAG_STRATEGY: recipe.approach},
                                  description=f"{recipe.approach} over {recipe.model_path}; one version per evaluated configuration")
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    done = [v for v in c.search_model_versions(f"name = '{name}'") if v.run_id == parent_id]
    if done:
        return name, str(done[0].version), False, update_best_alias(name, primary)
    yaml_text = recipe_yaml(recipe)
    signature = ModelSignature(inputs=Schema([ColSpec("string", "problem")]),
                               outputs=Schema([ColSpec("string", "problem"), ColSpec("string", "answer"),
                                               ColSpec("string", "completion"), ColSpec("double", "score")]))
    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / N.RECIPE_ARTIFACT
        recipe_file.write_text(yaml_text)
        model_dir = Path(tmp) / N.MODEL_ARTIFACT
        # models from code: the version holds this package's loader file and the recipe, never a pickle
        mlflow.pyfunc.save_model(str(model_dir), python_model=str(MODEL_CODE), artifacts={"recipe": str(recipe_file)},
                                 signature=signature, input_example=pd.DataFrame({"problem": ["What is $2 + 3$?"]}),
                                 pip_requirements=[f"mlflow=={mlflow.__version__}", "ttc_mlops"])
        c.log_artifacts(parent_id, str(model_dir), N.MODEL_ARTIFACT)
    source = f"{c.get_run(parent_id).info.artifact_uri}/{N.MODEL_ARTIFACT}"
    tags = {"recipe": yaml_text[:MAX_TAG_CHARS], N.TAG_SEARCH_KEY: recipe.search_key, N.TAG_PRM: recipe.prm_path,
            N.TAG_N: str(recipe.n), N.TAG_DATASET: recipe.dataset_name, "agg_strategy": recipe.agg_strategy,
            **{k: f"{v:.6g}" for k, v in metrics.items() if v is not None}}
    mv = c.create_model_version(name, source, run_id=parent_id, tags=tags,
                                description=f"{N.run_name(recipe)} on {recipe.dataset_name} (PRM {recipe.prm_path}, N={recipe.n})")
    return name, str(mv.version), True, update_best_alias(name, primary)


def update_best_alias(name: str, primary: str) -> str | None:
    """Point `best` at the version with the highest `primary` metric tag (the older one on a tie).
    A version that got nothing right is never `best`: while none did, the alias is not set."""
    c = store.client()
    scored = [(float(v.tags[primary]), -int(v.version), v.version) for v in c.search_model_versions(f"name = '{name}'")
              if primary in v.tags]
    if not scored or max(scored)[0] <= 0:
        log.info("no version of %s has %s above 0: alias %r not set", name, primary, N.BEST_ALIAS)
        return None
    best = max(scored)[2]
    c.set_registered_model_alias(name, N.BEST_ALIAS, str(best))
    return str(best)


def model_version_by_alias(name: str, alias: str = N.BEST_ALIAS):
    return store.client().get_model_version_by_alias(name, alias)
