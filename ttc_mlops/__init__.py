"""Test-time compute scaling for LLMs on math, as an MLflow pipeline; the search itself needs no MLflow.

    mlflow run . -e best_of_n --env-manager local

From Python (the same run loop as `ttc run`, so the same recipe and seed give the same records):

    import ttc_mlops as ttc
    recipe = ttc.load_recipe("recipes/SmolLM2-135M-Instruct/best_of_n.yaml", {"num_samples": 4})
    problems = ttc.load_problems(recipe)
    records = ttc.run_search(recipe, problems)  # loads the recipe's policy and PRM
    print(ttc.evaluate(records, recipe).at())   # accuracy per voting rule at n = N

Names are imported when first used, so `import ttc_mlops.names` (or `ttc --help`) stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "Recipe": "config", "RecipeError": "config", "build_recipe": "config", "load_recipe": "config",
    "Problem": "data",
    "Record": "records", "TreeNode": "records", "read_records": "records", "write_records": "records",
    "STRATEGIES": "strategies", "Strategy": "strategies",
    "load_problems": "runner", "run_search": "runner", "Usage": "runner", "run_metrics": "runner",
    "evaluate": "voting", "Evaluation": "voting",
    "load_policy": "policy", "load_prm": "prm",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ttc_mlops' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
