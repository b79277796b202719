from pathlib import Path

import pytest
from fakes import FakePolicy, FakePRM

from ttc_mlops import names
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe, RecipeError
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.run_chunk import run_chunk

PROBLEMS = builtin_problems()[:6]
SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.9]", "So \\boxed{0}[s=0.1]"] for p in PROBLEMS}


def recipe(**kw):
    return Recipe(**{"model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL, "dataset_name": BUILTIN_DATASET,
                     "num_samples": 6, "n": 4, "search_batch_size": 2, "experiment_name": "t", **kw})


def test_chunk_run_logs_params_tags_records_and_metrics(mlflow_store):
    result = run_chunk(recipe(), FakePolicy(SCRIPT), FakePRM(), progress=False)
    c = store.client()
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[names.TAG_PARENT] == result.parent_run_id
    assert run.data.tags[names.TAG_STRATEGY] == "best_of_n"
    assert run.data.params["n"] == "4" and run.data.params["agg_strategy"] == "last"
    assert run.data.metrics[names.M_PROBLEMS] == 6
    assert run.data.metrics[names.M_ACC_SELECTED] == 1.0
    assert run.data.metrics[names.M_UNGRADED] == 0
    records = store.load_records(result.run_id, names.chunk_artifact(0, 6))
    assert [r.problem_id for r in records] == [p.problem_id for p in PROBLEMS]
    parent = c.get_run(result.parent_run_id)
    assert parent.data.tags[names.TAG_ROLE] == "parent"
    assert parent.data.tags[names.TAG_SEARCH_KEY] == recipe().search_key


def test_finished_chunk_is_not_rerun(mlflow_store):
    first = run_chunk(recipe(), FakePolicy(SCRIPT), FakePRM(), progress=False)
    policy = FakePolicy(SCRIPT)
    again = run_chunk(recipe(), policy, FakePRM(), progress=False)
    assert again.skipped and again.run_id == first.run_id and policy.calls == []



def test_a_finished_chunk_with_a_truncated_records_artifact_is_repaired_on_rerun(mlflow_store, tmp_path):
    import gzip

    first = run_chunk(recipe(), FakePolicy(SCRIPT), FakePRM(), progress=False)
    name = names.chunk_artifact(0, 6)
    local = Path(store.client().download_artifacts(first.run_id, f"{names.RECORDS_DIR}/{name}", str(tmp_path)))
    lines = gzip.decompress(local.read_bytes()).splitlines(keepends=True)
    cut = tmp_path / "cut" / name  # four whole records, then half of the fifth: an upload cut short
    cut.parent.mkdir()
    cut.write_bytes(gzip.compress(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2]))
    store.client().log_artifact(first.run_id, str(cut), names.RECORDS_DIR)

    policy = FakePolicy(SCRIPT)
    again = run_chunk(recipe(), policy, FakePRM(), progress=False)
    assert not again.skipped and again.run_id == first.run_id and again.resumed_from == 4
    assert len(policy.calls) == 1  # only the batch that could not be read is searched again
    assert [r.to_dict() for r in again.records] == [r.to_dict() for r in first.records]
    run = store.client().get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [r.to_dict() for r in store.load_records(first.run_id, name)] == [r.to_dict() for r in first.records]

class Dying(FakePolicy):
    def __init__(self, script, die_after):
        super().__init__(script)
        self.die_after = die_after

    def generate(self, prompts, sampling, seeds):
        if len(self.calls) == self.die_after:
            raise KeyboardInterrupt("killed")
        return super().generate(prompts, sampling, seeds)


def test_killed_chunk_resumes_with_the_same_records(mlflow_store):
    with pytest.raises(KeyboardInterrupt):
        run_chunk(recipe(), Dying(SCRIPT, die_after=2), FakePRM(), progress=False)
    policy = FakePolicy(SCRIPT)
    resumed = run_chunk(recipe(), policy, FakePRM(), progress=False)
    assert resumed.resumed_from == 4 and len(policy.calls) == 1  # only the last batch ran
    fresh = run_chunk(recipe(experiment_name="u"), FakePolicy(SCRIPT), FakePRM(), progress=False)
    assert [r.to_dict() for r in resumed.records] == [r.to_dict() for r in fresh.records]
    # the metrics are totals over the chunk's work, the killed process's included
    for key in (names.M_GENERATE_CALLS, names.M_GENERATED_TOKENS, names.M_COMPLETION_TOKENS, names.M_PROBLEMS):
        assert resumed.metrics[key] == fresh.metrics[key], key
    assert resumed.metrics[names.M_GENERATE_CALLS] == 3 and resumed.metrics[names.M_WALL_S] > 0


def test_chunks_share_one_parent(mlflow_store):
    a = run_chunk(recipe(chunk=0, num_chunks=2), FakePolicy(SCRIPT), FakePRM(), progress=False)
    b = run_chunk(recipe(chunk=1, num_chunks=2), FakePolicy(SCRIPT), FakePRM(), progress=False)
    assert a.parent_run_id == b.parent_run_id and a.run_id != b.run_id
    assert len(store.chunk_runs(a.parent_run_id)) == 2


def test_bad_input_fails_before_any_run(mlflow_store):
    with pytest.raises(RecipeError, match="dataset_start=50 is past the end"):
        run_chunk(recipe(dataset_start=50), FakePolicy(SCRIPT), FakePRM(), progress=False)
    with pytest.raises(RecipeError, match="prm_path='acme/unknown-prm' is not a known PRM"):
        run_chunk(recipe(prm_path="acme/unknown-prm"), FakePolicy(SCRIPT), FakePRM(), progress=False)
    with pytest.raises(RecipeError, match="model_path='./no/such/dir': no such directory"):
        run_chunk(recipe(model_path="./no/such/dir"), FakePolicy(SCRIPT), FakePRM(), progress=False)
    assert store.client().search_experiments(filter_string="name = 't'") == []


def test_output_dir_gets_a_local_copy(mlflow_store, tmp_path):
    from ttc_mlops.records import read_records

    run_chunk(recipe(output_dir=str(tmp_path / "out")), FakePolicy(SCRIPT), FakePRM(), progress=False)
    assert len(read_records(tmp_path / "out" / names.chunk_artifact(0, 6))) == 6


def test_the_bar_moves_within_a_search_batch():
    from ttc_mlops.runner import MeteredPolicy, MeteredPRM, Progress, Usage

    moves = []
    plan = Progress(recipe(approach="beam_search", n=4, beam_width=2, num_iterations=10), moves.append)
    prm = MeteredPRM(FakePRM(), Usage(), plan.rows)
    plan.begin(4)
    for _ in range(3):
        prm.score(["p1", "p2", "p3", "p4"], [["a"]] * 4)
    assert sum(moves) == pytest.approx(4 * 3 / 10)  # three of ten iterations
    prm.score(["p1"], [["a"]])  # one problem moved on alone
    assert sum(moves) == pytest.approx(4 * 3 / 10 + 1 / 10)
    plan.end()
    assert sum(moves) == pytest.approx(4)
    moves.clear()
    # DVTS: one row per subtree, and subtrees move on apart (n=4, M=2: two per problem)
    plan = Progress(recipe(approach="dvts", n=4, beam_width=2, num_iterations=10), moves.append)
    prm = MeteredPRM(FakePRM(), Usage(), plan.rows)
    plan.begin(4)
    prm.score(["p1", "p1", "p2"], [["a"], ["b"], ["c"]])
    assert sum(moves) == pytest.approx(4 * 3 / 80)
    moves.clear()
    plan = Progress(recipe(n=4, max_tokens=100), moves.append)  # best-of-N: by tokens, reported per decoding step
    policy = FakePolicy(SCRIPT)
    MeteredPolicy(policy, Usage(), plan.tokens)
    plan.begin(2)
    policy.progress(200)
    assert sum(moves) == pytest.approx(2 * 200 / 800)


def test_a_chunk_whose_records_were_all_checkpointed_finishes_without_a_model(mlflow_store, monkeypatch):
    from ttc_mlops import policy as policy_mod
    from ttc_mlops import prm as prm_mod

    class Params(FakePolicy):
        params = 1000

    real = store.log_metrics
    monkeypatch.setattr(store, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):  # dies after its last checkpoint, before FINISHED
        run_chunk(recipe(), Params(SCRIPT), FakePRM(), progress=False)
    monkeypatch.setattr(store, "log_metrics", real)

    def no_model(settings):
        raise AssertionError("a model was loaded with nothing left to search")

    monkeypatch.setattr(policy_mod, "load_policy", no_model)
    monkeypatch.setattr(prm_mod, "load_prm", no_model)
    again = run_chunk(recipe(), progress=False)  # the recipe's own models: none may load
    assert not again.skipped and again.resumed_from == 6
    run = store.client().get_run(again.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[names.M_PROBLEMS] == 6 and run.data.metrics[names.M_GENERATE_CALLS] == 3
    assert run.data.metrics[names.M_POLICY_PARAMS] == 1000  # the checkpoint's counters carry what FLOPs need


def test_an_unwritable_output_dir_is_refused_before_any_run(mlflow_store, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(RecipeError, match="output_dir=.*cannot be written"):
        run_chunk(recipe(output_dir=str(blocked / "out")), FakePolicy(SCRIPT), FakePRM(), progress=False)
    assert store.client().search_experiments(filter_string="name = 't'") == []


def test_the_notebook_path_gives_the_records_of_a_chunk_run(mlflow_store):
    import ttc_mlops as ttc

    r = recipe(approach="beam_search", n=2, beam_width=2, num_iterations=2, search_batch_size=4)
    chunk = run_chunk(r, FakePolicy(SCRIPT), FakePRM(), progress=False)
    records = ttc.run_search(r, ttc.load_problems(r), FakePolicy(SCRIPT), FakePRM())
    assert [x.to_dict() for x in records] == [x.to_dict() for x in chunk.records]
    # the naive vote at N picks the selected completion: evaluate and the chunk's metric agree
    assert ttc.evaluate(records, r).at()["acc_naive"] == chunk.metrics[names.M_ACC_SELECTED] > 0
