"""Searches as MLflow traces: one per sampled problem on the parent, built from the records.

    python -m pytest -q tests/test_traces.py
"""

import copy

import pytest
from fakes import FakePolicy, FakePRM

from ttc_mlops import names
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store, traces
from ttc_mlops.pipeline.evaluate import evaluate_parent
from ttc_mlops.pipeline.merge import log_merge, merge
from ttc_mlops.pipeline.run_chunk import run_chunk
from ttc_mlops.records import Record, TreeNode

PROBLEMS = builtin_problems()[:6]
# the first problem's first completion is right, every other problem's best completion is wrong
SCRIPT = {p.problem: [f"Work it out.[s=0.6]\n\nStep two.[s=0.7]\n\nSo \\boxed{{{p.answer if i == 0 else 12345}}}[s=0.8]",
                      "Guess.[s=0.5]\n\nSo \\boxed{0}[s=0.3]"] for i, p in enumerate(PROBLEMS)}


def beam_recipe(**kw) -> Recipe:
    return Recipe(**{"approach": "beam_search", "model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL,
                     "dataset_name": BUILTIN_DATASET, "num_samples": 6, "n": 4, "beam_width": 2, "num_iterations": 3,
                     "experiment_name": "traces", **kw})


def searched(recipe: Recipe) -> str:
    pid = run_chunk(recipe, FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
    log_merge(merge(pid, recipe))
    return pid


def full_traces(pid: str, filter_string: str | None = None) -> list:
    exp = store.get_run(pid).info.experiment_id
    return list(store.client().search_traces(locations=[exp], run_id=pid, filter_string=filter_string, max_results=500))


def tree_record(**kw) -> Record:
    tree = [TreeNode(0, None, 0, "A.\n\n", "", 3, "stop", 0.9, 0.9, "kept"),
            TreeNode(1, None, 0, "B.\n\n", "", 4, "stop", 0.2, 0.2, "pruned"),
            TreeNode(2, 0, 1, "So \\boxed{5}", "", 5, "eos", 0.8, 0.8, "finished", completion=0)]
    return Record(**{"problem_id": "p/1", "problem": "2+3?", "answer": "5", "level": 5, "subject": "Algebra",
                     "completions": ["A.\n\nSo \\boxed{5}"], "step_scores": [[0.9, 0.8]], "agg_scores": [0.8],
                     "completion_tokens": [8], "finish_reasons": ["eos"], "selected": 0, "pred": "5",
                     "approach": "beam_search", "agg_strategy": "last", "tree": tree, **kw})


def test_a_trace_is_the_search_of_one_record_and_leaves_it_unchanged():
    record = tree_record()
    before = copy.deepcopy(record.to_dict())
    root, children = traces.trace_spans(record, {"problem_id": "p/1", "correct": True, "weighted_vote": "5",
                                                 "pass": True}, beam_recipe())
    assert record.to_dict() == before  # tracing reads a record, never writes it
    assert root["inputs"]["problem"] == "2+3?" and root["inputs"]["gold"] == "5"
    assert root["outputs"]["answer"] == "5" and root["outputs"]["verdict"] == "true"
    assert [c["name"] for c in children] == ["iteration 0", "iteration 1", "select"]
    first = children[0]
    assert [c["step_score"] for c in first["outputs"]["candidates"]] == [0.9, 0.2]
    assert first["outputs"]["status"] == {"kept": [0], "pruned": [1]}
    assert first["attributes"]["tokens"] == 7 and first["attributes"]["status.pruned"] == 1
    # iteration 1 continued node 0: its prompt is the problem and the steps so far
    assert children[0]["inputs"]["prompts"] == [{"continues": None, "steps": []}]
    assert children[1]["inputs"]["prompts"] == [{"continues": 0, "steps": [0]}]
    assert children[-1]["outputs"] == {"selected": 0, "answer": "5"}


def test_best_of_n_has_one_round_of_whole_completions():
    record = tree_record(tree=[], approach="best_of_n", completions=["x", "y"], step_scores=[[0.1], [0.7]],
                         agg_scores=[0.1, 0.7], completion_tokens=[1, None], finish_reasons=["eos", "length"], selected=1)
    root, children = traces.trace_spans(record, None, beam_recipe(approach="best_of_n"))
    assert root["outputs"]["verdict"] == "ungraded"
    assert [c["name"] for c in children] == ["sample and score", "select"]
    assert [c["agg"] for c in children[0]["outputs"]["candidates"]] == [0.1, 0.7]
    assert children[0]["attributes"]["tokens"] == 1


def test_the_sample_is_stable_and_bounded():
    records = [tree_record(problem_id=f"p/{i}") for i in range(40)]
    chosen = traces.sample(records, 8)
    assert len(chosen) == 8 and chosen == traces.sample(list(reversed(records)), 8)[::-1]
    assert [r.problem_id for r in chosen] == [r.problem_id for r in records if r in chosen]  # in their own order
    assert traces.sample(records[:5], 8) == records[:5] and traces.sample(records, 0) == []


def test_trace_problems_never_changes_the_search_key():
    assert beam_recipe().search_key == beam_recipe(trace_problems=0).search_key == beam_recipe(trace_problems=500).search_key
    assert "trace_problems" not in beam_recipe().result_params()


@pytest.mark.slow
def test_evaluate_writes_one_trace_per_sampled_problem_linked_to_the_parent(mlflow_store):
    recipe = beam_recipe(trace_problems=4)
    pid = searched(recipe)
    merged = store.load_records(pid, names.MERGED_RECORDS)
    result = evaluate_parent(pid, recipe, register=False, workers=1)
    assert len(result.traces) == 4
    found = full_traces(pid)
    assert sorted(t.info.trace_id for t in found) == sorted(result.traces)
    assert all(t.info.tags["mlflow.traceName"] == t.info.tags[names.TRACE_TAG_PROBLEM] for t in found)
    other = store.client().create_run(store.get_run(pid).info.experiment_id).info.run_id
    assert full_traces(other) == []  # linked to their parent only
    sampled = {r.problem_id for r in traces.sample(merged, 4)}
    assert {t.info.tags[names.TRACE_TAG_PROBLEM] for t in found} == sampled
    trace = next(t for t in found if t.info.tags[names.TRACE_TAG_PROBLEM] == PROBLEMS[1].problem_id) \
        if PROBLEMS[1].problem_id in sampled else found[0]
    tags = trace.info.tags
    assert tags[names.TRACE_TAG_STRATEGY] == "beam_search" and tags[names.TRACE_TAG_N] == "4"
    root = trace.data.spans[0]
    assert root.parent_id is None and root.inputs["gold"] is not None and root.outputs["verdict"] == tags[names.TRACE_TAG_CORRECT]
    iterations = [s for s in trace.data.spans if s.name.startswith("iteration")]
    assert iterations and all(s.parent_id == root.span_id for s in iterations)
    candidates = iterations[0].outputs["candidates"]
    assert candidates and all(isinstance(c["step_score"], float) and c["status"] for c in candidates)
    record = next(r for r in merged if r.problem_id == tags[names.TRACE_TAG_PROBLEM])
    assert [c["step_score"] for c in candidates] == [n.step_score for n in record.tree if n.iteration == 0]
    # the records the traces were written from are unchanged
    assert [r.to_dict() for r in store.load_records(pid, names.MERGED_RECORDS)] == [r.to_dict() for r in merged]


@pytest.mark.slow
def test_traces_are_searchable_by_verdict_and_level(mlflow_store):
    recipe = beam_recipe(trace_problems=6)
    pid = searched(recipe)
    evaluate_parent(pid, recipe, register=False, workers=1)
    wrong = full_traces(pid, f"tags.`{names.TRACE_TAG_CORRECT}` = 'false'")
    assert {t.info.tags[names.TRACE_TAG_PROBLEM] for t in wrong} == {p.problem_id for p in PROBLEMS[1:]}
    level = PROBLEMS[1].level
    at_level = full_traces(pid, f"tags.`{names.TRACE_TAG_CORRECT}` = 'false' AND tags.`{names.TRACE_TAG_LEVEL}` = '{level}'")
    assert at_level and {t.info.tags[names.TRACE_TAG_PROBLEM] for t in at_level} == \
        {p.problem_id for p in PROBLEMS[1:] if p.level == level}


@pytest.mark.slow
def test_evaluating_again_never_duplicates_and_a_new_sample_replaces(mlflow_store):
    recipe = beam_recipe(trace_problems=3)
    pid = searched(recipe)
    first = evaluate_parent(pid, recipe, register=False, workers=1).traces
    again = evaluate_parent(pid, recipe, register=False, workers=1)
    assert again.already and again.traces == [] and sorted(t.info.trace_id for t in full_traces(pid)) == sorted(first)
    bigger = evaluate_parent(pid, recipe.model_copy(update={"trace_problems": 5}), register=False, workers=1).traces
    assert len(bigger) == 5 and sorted(t.info.trace_id for t in full_traces(pid)) == sorted(bigger)
    assert evaluate_parent(pid, recipe.model_copy(update={"trace_problems": 0}), register=False, workers=1).traces == []
    assert len(full_traces(pid)) == 5  # 0 writes none, and leaves what was written


@pytest.mark.slow
def test_an_old_run_is_traced_by_evaluating_it_again(mlflow_store):
    recipe = beam_recipe(trace_problems=0)
    pid = searched(recipe)
    evaluate_parent(pid, recipe, register=False, workers=1)  # as before traces existed
    assert full_traces(pid) == [] and names.TAG_TRACED not in store.get_run(pid).data.tags
    later = evaluate_parent(pid, recipe.model_copy(update={"trace_problems": 2}), register=False, workers=1)
    assert later.already and len(later.traces) == 2 and len(full_traces(pid)) == 2
