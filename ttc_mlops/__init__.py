"""Test-time compute scaling for LLMs on math, as an MLflow pipeline.

    mlflow run . -e best_of_n --env-manager local
"""

__version__ = "0.1.0"
