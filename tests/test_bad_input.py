"""Bad input gets one clear error (the field, the value, what is expected), a non-zero exit, nothing
written to the store and no model time: through the real CLI against a real SQLite store.

    python -m pytest -q tests/test_bad_input.py
"""

import gzip
import json

import pytest
from conftest import REPO
from fakes import FakePolicy, FakePRM
from typer.testing import CliRunner

from ttc_mlops import names
from ttc_mlops.cli import app
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.merge import MergeError, merge
from ttc_mlops.pipeline.run_chunk import run_chunk

RECIPE = str(REPO / "recipes" / "SmolLM2-135M-Instruct" / "best_of_n.yaml")
runner = CliRunner()


def nothing_written() -> bool:
    c = store.client()
    experiments = [e for e in c.search_experiments() if e.name != "Default"]
    return experiments == [] and c.search_runs([e.experiment_id for e in c.search_experiments()]) == []


def ttc(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "is not a text file (byte"),
    (b"- a list\n- not a mapping\n", "must be a mapping of Recipe fields, got list"),
])
def test_a_recipe_that_is_not_a_recipe(mlflow_store, tmp_path, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    out = ttc("run", str(bad))
    assert out.exit_code == 2 and f"recipe={str(bad)!r}" in out.output and message in out.output
    assert nothing_written()


@pytest.mark.parametrize("name, content, message", [
    ("garbage.jsonl", b"\xff\xfe\x00\x01 not text", "is not a UTF-8 text file of JSON rows"),
    ("rows.jsonl", b'{"problem": "1+1?", "answer": "2"}\n[1, 2]\n', "row 2 is a JSON list, expected an object"),
    ("broken.parquet", b"PAR1 this is not parquet", "is not a readable parquet file"),
    ("empty.jsonl", b"\n", "has no problems"),
    ("noanswer.jsonl", b'{"problem": "1+1?"}\n{"problem": "2+2?"}\n',
     "2 of 2 problems have no gold answer"),
])
def test_a_dataset_that_cannot_be_read_or_graded(mlflow_store, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    out = ttc("run", RECIPE, "--set", f"dataset_name={path}", "--set", "num_samples=null")
    assert out.exit_code == 2 and f"dataset_name={str(path)!r}" in out.output and message in out.output, out.output
    assert nothing_written()


def test_unanswered_problems_run_when_asked(mlflow_store, tmp_path):
    path = tmp_path / "noanswer.jsonl"
    path.write_text("\n".join(json.dumps({"problem": p.problem}) for p in builtin_problems()[:2]) + "\n")
    script = {p.problem: ["So \\boxed{1}[s=0.5]"] for p in builtin_problems()[:2]}
    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=str(path), n=1, require_answers=False,
               experiment_name="open")
    result = run_chunk(r, FakePolicy(script), FakePRM(), progress=False)
    assert len(result.records) == 2 and all(rec.answer is None for rec in result.records)


def test_messages_say_where_a_value_came_from(mlflow_store):
    out = ttc("run", RECIPE, "--set", "n=abc")
    assert out.exit_code == 2 and "n='abc' in --set" in out.output
    out = ttc("validate", RECIPE, "--set", "temprature=0.5")
    assert out.exit_code == 2 and "did you mean 'temperature'?" in out.output
    out = ttc("run", RECIPE, "--set", "dataset_start=100")
    assert out.exit_code == 2 and "dataset_start=100 is past the end of the dataset (8 problems)" in out.output
    assert nothing_written()


@pytest.mark.parametrize("offline, message", [
    ("1", "is not in the local Hub cache and HF_HUB_OFFLINE is set"),
    ("0", "is not in the local Hub cache and the Hub cannot be reached"),  # no network here
])
def test_a_hub_model_that_cannot_be_had_fails_before_anything_is_written(mlflow_store, monkeypatch, offline, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    out = ttc("run", RECIPE, "--set", "model_path=nobody/no-such-model-here")
    assert out.exit_code == 2 and "model_path='nobody/no-such-model-here'" in out.output and message in out.output
    assert nothing_written()


@pytest.mark.slow
def test_parent_run_ids_that_are_not_this_configurations_parent(mlflow_store):
    script = {p.problem: ["So \\boxed{1}[s=0.5]"] for p in builtin_problems()[:2]}
    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET, num_samples=2, n=1,
               experiment_name="p")
    done = run_chunk(r, FakePolicy(script), FakePRM(), progress=False)
    before = len(store.chunk_runs(done.parent_run_id))
    for given, message in [("0123456789abcdef0123456789abcdef", "no such run"),
                           (done.run_id, f"is a chunk run ({names.TAG_ROLE}=chunk), not a parent"),
                           (done.parent_run_id, "belongs to another search configuration")]:
        out = ttc("run", RECIPE, "--set", "num_samples=2", "--parent-run-id", given)
        assert out.exit_code == 2 and f"parent_run_id={given!r}" in out.output and message in out.output, out.output
    assert len(store.chunk_runs(done.parent_run_id)) == before  # nothing nested, nothing run


def test_merge_refuses_records_of_the_wrong_shape(mlflow_store, tmp_path):
    script = {p.problem: ["So \\boxed{1}[s=0.5]"] for p in builtin_problems()[:2]}
    r = Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET, num_samples=2, n=1,
               experiment_name="m")
    done = run_chunk(r, FakePolicy(script), FakePRM(), progress=False)
    rows = [rec.to_dict() for rec in done.records]
    rows[1]["completions"] = None
    bad = tmp_path / names.chunk_artifact(0, 2)
    bad.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    store.client().log_artifact(done.run_id, str(bad), names.RECORDS_DIR)
    with pytest.raises(MergeError, match=r"record 'builtin/001': completions=None is not a list of strings"):
        merge(done.parent_run_id, r)


def test_a_compute_optimal_run_without_its_table_fails_before_any_model_loads(mlflow_store, tmp_path):
    recipe = str(REPO / "recipes" / "SmolLM2-135M-Instruct" / "compute_optimal.yaml")
    missing = tmp_path / "no-table.json"
    out = ttc("run", recipe, "--set", f"optimal_table={missing}")
    assert out.exit_code == 2 and f"optimal_table={str(missing)!r}" in out.output, out.output
    assert nothing_written()
