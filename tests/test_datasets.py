"""Problem sets as MLflow datasets: chunk and parent runs log their problems, and "the same problems"
is read from them, one way for `ttc compare` and the `best` alias.

    python -m pytest -q tests/test_datasets.py
"""

import json

import pytest
from fakes import FakePolicy, FakePRM

from ttc_mlops import names
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.compare import MixedProblemsError, collect
from ttc_mlops.pipeline.evaluate import evaluate_parent
from ttc_mlops.pipeline.merge import log_merge, merge
from ttc_mlops.pipeline.run_chunk import run_chunk
from ttc_mlops.records import problem_set_digest

PROBLEMS = builtin_problems()[:4]
SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.8]", "So \\boxed{0}[s=0.4]"] for p in PROBLEMS}


def recipe(**kw) -> Recipe:
    return Recipe(**{"model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL, "dataset_name": BUILTIN_DATASET,
                     "num_samples": 4, "experiment_name": "datasets", "trace_problems": 0, **kw})


def eval_inputs(run) -> list:
    return [d for d in run.inputs.dataset_inputs
            if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == names.DATASET_CONTEXT]


@pytest.mark.slow
def test_chunks_and_parent_log_their_problems_as_datasets(mlflow_store):
    r = recipe(num_chunks=2, chunk=0)
    chunk = run_chunk(r, FakePolicy(SCRIPT), FakePRM(), progress=False)
    run_chunk(r.model_copy(update={"chunk": 1}), FakePolicy(SCRIPT), FakePRM(), progress=False)
    pid = chunk.parent_run_id
    (logged,) = eval_inputs(store.get_run(chunk.run_id))
    assert logged.dataset.name == BUILTIN_DATASET and logged.dataset.source_type == "code"
    assert logged.dataset.digest == problem_set_digest(p.problem_id for p in PROBLEMS[:2])  # the chunk's rows
    assert json.loads(logged.dataset.profile) == {"num_rows": 2}
    log_merge(merge(pid, r))
    evaluate_parent(pid, r, register=False, workers=1)
    parent = store.get_run(pid)
    (logged,) = eval_inputs(parent)
    assert logged.dataset.digest == parent.data.tags[names.TAG_PROBLEM_SET]  # the digest the tag always had
    assert store.problem_set(parent) == (BUILTIN_DATASET, 4, parent.data.tags[names.TAG_PROBLEM_SET])


@pytest.mark.slow
def test_experiments_open_in_the_machine_learning_view(mlflow_store):
    made = store.ensure_experiment("kind")
    assert store.client().get_experiment(made).tags[names.TAG_EXPERIMENT_KIND] == "custom_model_development"
    older = store.client().create_experiment("older")  # made before the kind was set
    store.ensure_experiment("older")
    assert store.client().get_experiment(older).tags[names.TAG_EXPERIMENT_KIND] == "custom_model_development"
    pid, _ = evaluated(register=False)
    exp = store.get_run(pid).info.experiment_id
    store.client().delete_experiment_tag(exp, names.TAG_EXPERIMENT_KIND)  # an experiment of older runs
    evaluate_parent(pid, recipe(), register=False, workers=1)  # evaluating there again sets it
    assert store.client().get_experiment(exp).tags[names.TAG_EXPERIMENT_KIND] == "custom_model_development"
    store.client().set_experiment_tag(older, names.TAG_EXPERIMENT_KIND, "genai_development")  # a user's choice
    store.ensure_experiment("older")
    assert store.client().get_experiment(older).tags[names.TAG_EXPERIMENT_KIND] == "genai_development"


def test_hub_and_file_sources(tmp_path):
    hub = store.problem_dataset(recipe(dataset_name="HuggingFaceH4/MATH-500"), ["a", "b"])
    assert hub.source_type == "hugging_face" and json.loads(hub.source)["path"] == "HuggingFaceH4/MATH-500"
    assert json.loads(hub.source)["split"] == "test" and hub.digest == problem_set_digest(["b", "a"])
    local = store.problem_dataset(recipe(dataset_name=str(tmp_path / "mine.jsonl")), ["a"])
    assert local.source_type == "local" and json.loads(local.source)["uri"] == (tmp_path / "mine.jsonl").as_uri()
    assert local.name == str(tmp_path / "mine.jsonl")


def evaluated(register=True, **kw):
    r = recipe(**kw)
    pid = run_chunk(r, FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
    log_merge(merge(pid, r))
    return pid, evaluate_parent(pid, r, register=register, workers=1)


@pytest.mark.slow
def test_compare_reads_the_logged_dataset_and_old_runs_their_tags(mlflow_store):
    four, _ = evaluated(register=False)
    old, _ = evaluated(register=False, n=8)
    # an old run: the same problems, but only the tag says so (no dataset input)
    store.client().set_tag(old, names.TAG_PROBLEM_SET, store.get_run(four).data.tags[names.TAG_PROBLEM_SET])
    assert store.problem_set(store.get_run(four)).key == store.tagged_problem_set(store.get_run(old).data.tags).key
    collect("datasets")  # one problem set: no refusal
    two, _ = evaluated(register=False, n=2, num_samples=2)
    with pytest.raises(MixedProblemsError, match=rf"{BUILTIN_DATASET}, 2 problems, set "
                                                 rf"{problem_set_digest(p.problem_id for p in PROBLEMS[:2])}"):
        collect("datasets")
    assert collect("datasets", allow_mixed=True)


@pytest.mark.slow
def test_the_best_alias_reads_problem_sets_as_compare_does(mlflow_store):
    half = {p.problem: [f"So \\boxed{{{p.answer if i % 2 == 0 else 0}}}[s=0.7]"] for i, p in enumerate(PROBLEMS)}
    small = {p.problem: [f"So \\boxed{{{p.answer}}}[s=0.7]"] for p in PROBLEMS}

    def registered(script, **kw):
        r = recipe(n=1, **kw)
        pid = run_chunk(r, FakePolicy(script), FakePRM(), progress=False).parent_run_id
        log_merge(merge(pid, r))
        return pid, evaluate_parent(pid, r, workers=1)

    pid_two, two = registered(half, num_samples=2)  # 1 of 2 right
    pid_one, one = registered(small, num_samples=1)  # 1 of 1 right, on a smaller set: never compared with it
    name = two.registered[0]
    assert one.best == two.best == two.registered[1]
    version = store.client().get_model_version(name, one.registered[1])
    assert version.tags[names.TAG_PROBLEM_SET] == store.problem_set(store.get_run(pid_one)).digest
    # what decides is the versions' runs' datasets, not the tags the versions were registered with
    for v in (two.registered[1], one.registered[1]):
        for key in (names.TAG_PROBLEM_SET, names.TAG_MERGED_PROBLEMS):
            store.client().delete_model_version_tag(name, v, key)
    from ttc_mlops.pipeline.model import update_best_alias

    assert store.problem_set(store.get_run(pid_one)).key != store.problem_set(store.get_run(pid_two)).key
    assert update_best_alias(name, names.M_ACC_WEIGHTED) == two.registered[1]
