import json

import pytest

from ttc_mlops.config import BUILTIN_DATASET, Recipe, RecipeError
from ttc_mlops.data import (
    builtin_problems,
    chunk_bounds,
    load_dataset_problems,
    row_range,
    rows_to_problems,
)
from ttc_mlops.grading import is_equiv


def recipe(**kw):
    return Recipe(**{"dataset_name": BUILTIN_DATASET, **kw})


def load_problems(r):
    """The problems one process works on, as a chunk run cuts them."""
    problems = load_dataset_problems(r)
    start, end = row_range(len(problems), r)
    return problems[start:end]


def test_builtin_set_has_every_answer_form():
    problems = builtin_problems()
    assert len(problems) >= 30
    answers = " ".join(p.answer for p in problems)
    for form in ("\\frac", "\\sqrt", "(2,3)", "\\infty", "[-3,3]", "\\text"):
        assert form in answers
    assert all(is_equiv(p.answer, p.answer) for p in problems)  # every gold answer parses


def test_math500_ids_levels_and_slices(math500):
    problems = load_dataset_problems(recipe(dataset_name=str(math500)))
    assert len(problems) == 500
    assert problems[0].problem_id == "test/precalculus/807.json"
    assert {p.level for p in problems} == {1, 2, 3, 4, 5}
    sliced = load_problems(recipe(dataset_name=str(math500), dataset_start=10, dataset_end=20))
    assert [p.problem_id for p in sliced] == [p.problem_id for p in problems[10:20]]
    assert len(load_problems(recipe(dataset_name=str(math500), num_samples=7))) == 7
    assert len(load_problems(recipe(dataset_name=str(math500), dataset_start=495, dataset_end=600))) == 5


def test_gsm8k_answers_and_ids(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "so 2\n#### 1,002"}) + "\n")
    (p,) = load_dataset_problems(recipe(dataset_name=str(f)))
    assert (p.problem_id, p.answer) == ("gsm/0", "1002")


@pytest.mark.parametrize("size, k", [(500, 3), (500, 7), (500, 500), (10, 4), (1, 1)])
def test_chunks_cover_every_row_exactly_once(size, k):
    rows = [i for c in range(k) for i in range(*chunk_bounds(size, c, k))]
    assert rows == list(range(size))


def test_chunk_slices(math500):
    parts = [load_problems(recipe(dataset_name=str(math500), chunk=c, num_chunks=3)) for c in range(3)]
    assert sum(len(p) for p in parts) == 500
    assert len({p.problem_id for part in parts for p in part}) == 500


def test_bad_data_inputs(tmp_path):
    with pytest.raises(RecipeError, match="dataset_start=40 is past the end"):
        load_problems(recipe(dataset_start=40))
    with pytest.raises(RecipeError, match="dataset_name='/nope.jsonl': no such file"):
        load_problems(recipe(dataset_name="/nope.jsonl"))
    with pytest.raises(RecipeError, match="num_chunks=99 is larger"):
        load_problems(recipe(num_samples=5, chunk=0, num_chunks=99))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x"}\nnot json\n')
    with pytest.raises(RecipeError, match="line 2 is not JSON"):
        load_problems(recipe(dataset_name=str(bad)))


def test_duplicate_problem_texts_keep_distinct_ids():
    problems = rows_to_problems([{"problem": "same", "answer": "1"}, {"problem": "same", "answer": "1"}], "d")
    assert [p.problem_id for p in problems] == ["d/0", "d/1"]


def test_math500_ships_in_the_package_with_a_level_filter(math500):
    from ttc_mlops.config import BUILTIN_MATH500

    builtin = load_dataset_problems(recipe(dataset_name=BUILTIN_MATH500))
    shared = load_dataset_problems(recipe(dataset_name=str(math500)))
    assert builtin == shared  # the same 500 rows, ids, answers and levels as the published file
    level1 = load_dataset_problems(recipe(dataset_name=BUILTIN_MATH500, dataset_levels=[1], num_samples=10))
    assert len(level1) == 10 and {p.level for p in level1} == {1}
    assert len(load_dataset_problems(recipe(dataset_name=BUILTIN_MATH500, dataset_levels=[4, 5]))) == 128 + 134
    from ttc_mlops.config import build_recipe

    with pytest.raises(RecipeError, match=r"dataset_levels=\[6\] must be a non-empty list of MATH levels 1-5"):
        build_recipe({"dataset_name": BUILTIN_MATH500, "dataset_levels": [6]})
