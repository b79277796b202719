"""The code MLflow runs to load a registered version: models from code, so nothing is unpickled.

    python -c "import mlflow.pyfunc; print(mlflow.pyfunc.load_model('models:/ttc-SmolLM2-135M-Instruct-best_of_n@best'))"

`model.register_version` saves this file into the model (with the recipe as an artifact); loading
the version imports `ttc_mlops` as installed where it loads and builds the search from the recipe.
A version carries no Python object that whoever can write to the tracking server could replace.
"""

import mlflow

from ttc_mlops.pipeline.model import TTCSearchModel

mlflow.models.set_model(TTCSearchModel())
