"""Registry round trip: evaluate registers a version, `best` follows accuracy, the version loads
with mlflow.pyfunc and solves new problems with its strategy."""

from pathlib import Path

import pandas as pd
import pytest
from fakes import FakePolicy, FakePRM

from ttc_mlops import names
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.evaluate import evaluate_parent
from ttc_mlops.pipeline.merge import log_merge, merge
from ttc_mlops.pipeline.run_chunk import run_chunk

PROBLEMS = builtin_problems()[:3]


def script(right_wins: bool):
    """Every sample right, or every sample wrong."""
    return {p.problem: [f"So \\boxed{{{p.answer if right_wins else 0}}}[s=0.7]"] for p in PROBLEMS}


def evaluated(recipe, right_wins):
    pid = run_chunk(recipe, FakePolicy(script(right_wins)), FakePRM(), progress=False).parent_run_id
    log_merge(merge(pid, recipe))
    return evaluate_parent(pid, recipe, workers=1)


def base(model, **kw):
    return Recipe(**{"model_path": str(model), "prm_path": str(model), "prm_family": "rlhflow",
                     "dataset_name": BUILTIN_DATASET, "num_samples": 3, "n": 2, "max_tokens": 24,
                     "temperature": 1.0, "experiment_name": "reg", "device": "cpu", "dtype": "float32", **kw})


def round_trip(model):
    import mlflow.pyfunc

    worse = evaluated(base(model, seed=1), right_wins=False)
    name, v1 = worse.registered
    assert name == f"ttc-{base(model).model_label}-best_of_n" and v1 == "1"
    with pytest.raises(Exception, match="alias"):  # a version that got nothing right is never `best`
        store.client().get_model_version_by_alias(name, names.BEST_ALIAS)
    better = evaluated(base(model, seed=2), right_wins=True)
    assert better.registered == (name, "2")
    best = store.client().get_model_version_by_alias(name, names.BEST_ALIAS)
    assert str(best.version) == "2" and float(best.tags["acc_weighted"]) == 1.0
    assert best.tags[names.TAG_N] == "2" and best.tags[names.TAG_PRM] == str(model)
    assert "seed: 2" in best.tags["recipe"] and best.run_id == better.parent_run_id
    # evaluating the same parent again registers nothing new
    again = evaluate_parent(better.parent_run_id, base(model, seed=2), workers=1)
    assert again.registered == (name, "2")
    assert len(store.client().search_model_versions(f"name = '{name}'")) == 2

    # models from code: the version holds the loader file and the recipe, no pickled object
    files = {Path(a.path).name for a in store.client().list_artifacts(better.parent_run_id, "model")}
    assert "registered_model.py" in files and "MLmodel" in files and not any(f.endswith(".pkl") for f in files)
    from ttc_mlops.pipeline.model import load_search

    data_only = load_search(f"models:/{name}@best")  # the recipe alone, no code from the store
    assert data_only.recipe.seed == 2 and data_only.recipe.model_path == str(model)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@best")
    out = loaded.predict(pd.DataFrame({"problem": ["What is $2 + 3$?", "What is $3^4$?"]}))
    assert list(out.columns) == ["problem", "answer", "completion", "score"] and len(out) == 2
    assert all(isinstance(c, str) and c for c in out["completion"]) and out["score"].between(0, 1).all()
    return out


@pytest.mark.slow
def test_register_load_by_alias_and_predict(mlflow_store, tiny_llama_dir):
    round_trip(tiny_llama_dir)  # a tiny random model: the real code path in seconds


@pytest.mark.e2e
def test_register_and_predict_with_the_embedded_model(mlflow_store, embedded_dir):
    import mlflow.pyfunc

    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET, num_samples=2,
               n=2, max_tokens=32, experiment_name="reg-e2e")
    name, version = evaluated(r, right_wins=True).registered
    out = mlflow.pyfunc.load_model(f"models:/{name}@best").predict(pd.DataFrame({"problem": ["What is $2 + 3$?"]}))
    assert name == "ttc-SmolLM2-135M-Instruct-best_of_n" and len(out) == 1
    assert out["completion"][0] and 0 <= out["score"][0] <= 1


@pytest.mark.slow
def test_predict_names_the_missing_column(mlflow_store, tiny_llama_dir):
    import mlflow.pyfunc

    name, _ = evaluated(base(tiny_llama_dir), right_wins=True).registered
    with pytest.raises(Exception, match="problem"):
        mlflow.pyfunc.load_model(f"models:/{name}@best").predict(pd.DataFrame({"question": ["1+1?"]}))


@pytest.mark.slow
def test_a_whole_set_ttc_run_ends_merged_evaluated_and_registered(mlflow_store, tiny_llama_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from ttc_mlops.cli import app

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(base(tiny_llama_dir, num_samples=2, max_tokens=8).model_dump()))
    out = CliRunner().invoke(app, ["run", str(path), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "merged 2 of 2 problems from 1 chunk run(s)" in out.output and "acc_weighted" in out.output
    name = f"ttc-{base(tiny_llama_dir).model_label}-best_of_n"
    c = store.client()
    [version] = c.search_model_versions(f"name = '{name}'")
    assert sorted(m.step for m in c.get_metric_history(version.run_id, "acc_weighted")) == [1, 2]
    assert c.get_run(version.run_id).data.tags[names.TAG_MERGED] == "complete"
