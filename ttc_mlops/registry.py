"""A registered configuration as an MLflow pyfunc model: `predict` solves new problems with its search.

    python -c "import mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model('models:/ttc-SmolLM2-135M-Instruct-best_of_n@best'); print(m.predict(pd.DataFrame({'problem': ['What is 2+3?']})))"

`ttc evaluate` registers every evaluated configuration as a version of the registered model
`ttc-<policy model>-<strategy>` (tracking.register_version); the version holds the recipe, and
loading it builds the recipe's policy and PRM (the embedded model when the recipe names it) on the
first `predict`. This module imports mlflow only for the PythonModel base class.
"""

from __future__ import annotations

import hashlib
import logging

import mlflow.pyfunc

log = logging.getLogger(__name__)


class TTCSearchModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a `problem` column. Output: per problem the answer, the chosen
    completion and its aggregated score."""

    def load_context(self, context) -> None:
        from .config import load_recipe

        self.recipe = load_recipe(context.artifacts["recipe"])
        self._policy = self._prm = None

    def _models(self):
        if self._policy is None:
            from .policy import load_policy
            from .prm import load_prm

            self._policy, self._prm = load_policy(self.recipe), load_prm(self.recipe)
        return self._policy, self._prm

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from .data import Problem
        from .search import STRATEGIES

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
            records += strategy(problems[start : start + size], policy, prm, self.recipe)
        return pd.DataFrame({
            "problem": texts,
            "answer": [r.pred for r in records],
            "completion": [r.completions[r.selected] if r.selected is not None else None for r in records],
            "score": [float(r.agg_scores[r.selected]) if r.selected is not None else float("nan") for r in records],
        })
