"""Merge against a real MLflow store (SQLite), chunks produced by the runner with the fakes."""


import pytest
from fakes import FakePolicy, FakePRM
from typer.testing import CliRunner

from ttc_mlops import names
from ttc_mlops.cli import app
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.merge import (
    MergeError,
    log_merge,
    merge,
    push_to_hub,
    resolve_parent,
)
from ttc_mlops.pipeline.run_chunk import run_chunk

PROBLEMS = builtin_problems()[:7]
SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.9]", "So \\boxed{0}[s=0.1]", "Hmm.[s=0.3]"]
          for p in PROBLEMS}


def recipe(**kw):
    return Recipe(**{"model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL, "dataset_name": BUILTIN_DATASET,
                     "num_samples": 7, "n": 4, "search_batch_size": 2, "experiment_name": "m", **kw})


def run(r, policy=None):
    return run_chunk(r, policy or FakePolicy(SCRIPT), FakePRM(), progress=False)


def dicts(records):
    return [r.to_dict() for r in records]


def test_chunked_and_single_chunk_runs_merge_to_the_same_records(mlflow_store):
    parents = {run(recipe(chunk=i, num_chunks=3)).parent_run_id for i in range(3)}
    assert len(parents) == 1
    chunked = merge(parents.pop(), recipe())
    single = merge(run(recipe(experiment_name="single")).parent_run_id, recipe(experiment_name="single"))
    assert [r.problem_id for r in chunked.records] == [p.problem_id for p in PROBLEMS]
    assert dicts(chunked.records) == dicts(single.records) and not chunked.partial
    assert len(chunked.chunks) == 3 and chunked.digest == single.digest


def test_merge_logs_records_recipe_and_tags_on_the_parent(mlflow_store):
    pid = run(recipe()).parent_run_id
    result = merge(pid, recipe())
    log_merge(result)
    tags = store.client().get_run(pid).data.tags
    assert tags[names.TAG_MERGED] == "complete" and tags[names.TAG_MERGED_PROBLEMS] == "7"
    assert dicts(store.load_records(pid, names.MERGED_RECORDS)) == dicts(result.records)
    # the parent can now be named by id alone; its recipe comes back from the run
    assert resolve_parent(None, pid) == (pid, recipe())


class Dying(FakePolicy):
    def generate(self, prompts, sampling, seeds):
        if self.calls:
            raise KeyboardInterrupt("killed")
        return super().generate(prompts, sampling, seeds)


def test_merge_names_a_missing_chunk_and_writes_nothing(mlflow_store):
    a = run(recipe(chunk=0, num_chunks=3))
    run(recipe(chunk=1, num_chunks=3))  # rows 0:2, 2:4 done; rows 4:7 never ran
    with pytest.raises(MergeError) as err:
        merge(a.parent_run_id, recipe())
    message = str(err.value)
    assert "4 of 7 problems covered exactly once by 2 chunk run(s)" in message
    assert "missing 3 problem(s) of rows 4:7 (no chunk run): builtin/004, builtin/005, builtin/006" in message
    assert store.load_records(a.parent_run_id, names.MERGED_RECORDS) is None  # nothing written

    partial = merge(a.parent_run_id, recipe(), allow_partial=True)
    assert partial.partial and len(partial.records) == 4

    run(recipe(chunk=2, num_chunks=3))
    done = merge(a.parent_run_id, recipe())
    assert not done.partial and len(done.records) == 7


def test_a_chunk_killed_part_way_is_named_and_resumes(mlflow_store):
    r = recipe(chunk=1, num_chunks=2)  # rows 3:7, two batches of 2
    parent = run(recipe(chunk=0, num_chunks=2)).parent_run_id
    with pytest.raises(KeyboardInterrupt):
        run(r, Dying(SCRIPT))
    with pytest.raises(MergeError, match=r"missing 2 problem\(s\) of rows 3:7 \(run \w+, FAILED, 2 of 4 saved\): "
                                         r"builtin/005, builtin/006"):
        merge(parent, recipe())
    resumed = run(r)
    assert resumed.resumed_from == 2
    assert dicts(merge(parent, recipe()).records) == dicts(merge(run(recipe(experiment_name="x")).parent_run_id,
                                                                  recipe(experiment_name="x")).records)


def test_overlapping_slices_are_named_as_duplicates(mlflow_store):
    pid = run(recipe(dataset_start=0, dataset_end=4)).parent_run_id
    run(recipe(dataset_start=3, dataset_end=7))
    with pytest.raises(MergeError, match=r"duplicate builtin/003: in rows 0:4 \(run \w+, FINISHED, 4 of 4 saved\); "
                                         r"rows 3:7"):
        merge(pid, recipe())


def test_bad_input_is_named_and_nothing_is_written(mlflow_store):
    c = store.client()
    exp = store.ensure_experiment("m")
    empty = store.find_or_create_parent(recipe(), exp)
    with pytest.raises(MergeError, match=f"parent run {empty} has no chunk runs"):
        merge(empty, recipe())
    with pytest.raises(MergeError, match="no parent run with ttc.search_key="):
        resolve_parent(recipe(n=8), None)
    with pytest.raises(MergeError, match="no such run"):
        resolve_parent(None, "0" * 32)

    pid = run(recipe()).parent_run_id
    # a corrupt record file
    chunk = store.find_chunk_run(pid, 0, 7)
    path = store.client().download_artifacts(chunk.info.run_id, f"records/{names.chunk_artifact(0, 7)}")
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b not gzip at all")
    c.log_artifact(chunk.info.run_id, path, names.RECORDS_DIR)
    with pytest.raises(MergeError, match=f"chunk run {chunk.info.run_id} \\(0:7\\): record file .* is corrupt"):
        merge(pid, recipe())

    # records of another dataset under a chunk of this parent
    other = run(recipe(experiment_name="o", num_samples=7, dataset_name=_other_dataset(mlflow_store)))
    records = store.load_records(other.run_id, names.chunk_artifact(0, 7))
    store.log_records(chunk.info.run_id, records, names.chunk_artifact(0, 7))
    with pytest.raises(MergeError, match="record 'other/0' is not in dataset builtin:math-mini"):
        merge(pid, recipe())

    # a chunk run of another recipe hung under this parent
    foreign = store.create_chunk_run(pid, recipe(n=2, chunk=0, num_chunks=7), 0, 1, 7)
    with pytest.raises(MergeError, match=f"chunk run {foreign} \\(0:1\\) was run with another recipe.*n=2 \\(parent: 4\\)"):
        merge(pid, recipe())
    assert store.load_records(pid, names.MERGED_RECORDS) is None
    assert names.TAG_MERGED not in c.get_run(pid).data.tags


def _other_dataset(store_uri):
    import json
    from pathlib import Path

    path = Path(store_uri.removeprefix("sqlite:///")).parent / "other.jsonl"
    path.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in PROBLEMS))
    return str(path)


def test_cli_merge_exits_non_zero_naming_the_missing_rows(mlflow_store, tmp_path):
    pid = run(recipe(chunk=0, num_chunks=2)).parent_run_id
    cli = CliRunner()
    out = cli.invoke(app, ["merge", "--parent-run-id", pid])
    assert out.exit_code == 1 and "rows 3:7 (no chunk run)" in out.output
    out = cli.invoke(app, ["merge", "--parent-run-id", pid, "--allow-partial"])
    assert out.exit_code == 0, out.output
    assert store.client().get_run(pid).data.tags[names.TAG_MERGED] == "partial"
    out = cli.invoke(app, ["merge"])
    assert out.exit_code == 2 and "exactly one of RECIPE or --parent-run-id" in out.output


def test_push_to_hub_goes_up_to_the_upload_call(mlflow_store, monkeypatch):
    import datasets
    import huggingface_hub

    pushed = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_exists", lambda self, repo, repo_type=None: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, repo_type=None: ["README.md"])
    monkeypatch.setattr(datasets.Dataset, "push_to_hub",
                        lambda self, repo, config_name=None, private=None: pushed.update(
                            repo=repo, config=config_name, private=private, rows=self.to_list()))
    r = recipe(push_to_hub=True, hub_dataset_id="me/ttc-records", hub_dataset_private=True)
    result = merge(run(r).parent_run_id, r)
    config = push_to_hub(result)
    assert pushed["repo"] == "me/ttc-records" and pushed["private"] is True and pushed["config"] == config
    assert config.endswith(r.search_key) and len(pushed["rows"]) == 7
    assert pushed["rows"][0]["problem_id"] == "builtin/000" and pushed["rows"][0]["completions"]

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, repo_type=None: [f"{config}/x.parquet"])
    with pytest.raises(MergeError, match="already has config .* overwrite_hub_revision=true"):
        push_to_hub(result)
