import json

import pytest

from ttc_mlops.config import BUILTIN_DATASET, BUILTIN_MATH500, Recipe, RecipeError
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


def test_math500_ids_levels_and_slices():
    problems = load_dataset_problems(recipe(dataset_name=BUILTIN_MATH500))
    assert len(problems) == 500
    assert problems[0].problem_id == "test/precalculus/807.json"
    assert {p.level for p in problems} == {1, 2, 3, 4, 5}
    sliced = load_problems(recipe(dataset_name=BUILTIN_MATH500, dataset_start=10, dataset_end=20))
    assert [p.problem_id for p in sliced] == [p.problem_id for p in problems[10:20]]
    assert len(load_problems(recipe(dataset_name=BUILTIN_MATH500, num_samples=7))) == 7
    assert len(load_problems(recipe(dataset_name=BUILTIN_MATH500, dataset_start=495, dataset_end=600))) == 5


def test_gsm8k_answers_and_ids(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "so 2\n#### 1,002"}) + "\n")
    (p,) = load_dataset_problems(recipe(dataset_name=str(f)))
    assert (p.problem_id, p.answer) == ("gsm/0", "1002")


@pytest.mark.parametrize("size, k", [(500, 3), (500, 7), (500, 500), (10, 4), (1, 1)])
def test_chunks_cover_every_row_exactly_once(size, k):
    rows = [i for c in range(k) for i in range(*chunk_bounds(size, c, k))]
    assert rows == list(range(size))


def test_chunk_slices():
    parts = [load_problems(recipe(dataset_name=BUILTIN_MATH500, chunk=c, num_chunks=3)) for c in range(3)]
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


def test_the_packaged_math500_is_the_published_file(shared_math500):
    builtin = load_dataset_problems(recipe(dataset_name=BUILTIN_MATH500))
    shared = load_dataset_problems(recipe(dataset_name=str(shared_math500)))
    assert builtin == shared  # the same 500 rows, ids, answers and levels as the published file


def test_the_packaged_math500_filters_by_level():
    level1 = load_dataset_problems(recipe(dataset_name=BUILTIN_MATH500, dataset_levels=[1], num_samples=10))
    assert len(level1) == 10 and {p.level for p in level1} == {1}
    assert len(load_dataset_problems(recipe(dataset_name=BUILTIN_MATH500, dataset_levels=[4, 5]))) == 128 + 134
    from ttc_mlops.config import build_recipe

    with pytest.raises(RecipeError, match=r"dataset_levels=\[6\] must be a non-empty list of MATH levels 1-5"):
        build_recipe({"dataset_name": BUILTIN_MATH500, "dataset_levels": [6]})


# --- benchmarks people report beside MATH-500 (builtin:gsm8k, Hub AIME / AMC sets by their layout)

def test_gsm8k_ships_in_the_package():
    import re
    from pathlib import Path

    from ttc_mlops.data import BUILTIN_GSM8K

    problems = load_dataset_problems(recipe(dataset_name=BUILTIN_GSM8K))
    assert len(problems) == 1319 and problems[0].problem_id == "gsm8k/0" and problems[0].answer == "18"
    assert all(re.fullmatch(r"-?\d+", p.answer) for p in problems)  # the number after ####, no commas
    assert len({p.problem_id for p in problems}) == 1319
    published = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
    if published.is_file():  # the shipped copy is the published file, byte for byte
        import gzip

        from ttc_mlops.data import GSM8K_FILE

        assert gzip.decompress(GSM8K_FILE.read_bytes()) == published.read_bytes()
    with pytest.raises(RecipeError, match=r"dataset_name='builtin:gsm8' is no built-in dataset \(built in: .*builtin:gsm8k"):
        load_dataset_problems(recipe(dataset_name="builtin:gsm8"))


# A row of each Hub set as it is published (columns and value types), the gold answer it gives and the
# split the peers evaluate (lighteval, open-r1, Qwen2.5-Math and NeMo-Skills load them so).
HUB_ROWS = {
    "HuggingFaceH4/MATH-500": ({"problem": "What is $1+1$?", "solution": "So $\\boxed{2}$.", "answer": "2",
                                "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}, "2", "test"),
    "openai/gsm8k": ({"question": "Ann has 1,000 apples and buys 2.", "answer": "1000+2=1002\n#### 1,002"}, "1002", "test"),
    "HuggingFaceH4/aime_2024": ({"id": 60, "problem": "Find $m+n$.", "solution": "... $\\boxed{204}$", "answer": "204",
                                 "url": "https://artofproblemsolving.com/wiki/2024_AIME_I_Problems/Problem_1", "year": "2024"}, "204", "train"),
    "Maxwell-Jia/AIME_2024": ({"ID": "2024-I-1", "Problem": "Find $m+n$.", "Solution": "...", "Answer": 204}, "204", "train"),
    "yentinglin/aime_2025": ({"id": "I-1", "problem": "Find the sum.", "solution": "...", "answer": "70",
                              "url": "https://artofproblemsolving.com/wiki/2025_AIME_I_Problems/Problem_1", "year": "2025"}, "70", "train"),
    "math-ai/aime25": ({"problem": "Find the sum.", "answer": "70", "id": "0"}, "70", "test"),
    "AI-MO/aimo-validation-amc": ({"id": 0, "problem": "What is the product?", "answer": 142.0,
                                   "url": "https://artofproblemsolving.com/wiki/2023_AMC_12A_Problems/Problem_1"}, "142", "train"),
    "math-ai/amc23": ({"id": 0, "question": "What is the product?", "answer": 27.0,
                       "url": "https://artofproblemsolving.com/wiki/2023_AMC_12A_Problems/Problem_1"}, "27", "test"),
}


def test_every_hub_layout_has_a_published_row():
    from ttc_mlops.data import HUB_LAYOUTS

    assert set(HUB_ROWS) == set(HUB_LAYOUTS)


@pytest.mark.parametrize("hub_id", sorted(HUB_ROWS))
def test_hub_benchmarks_load_by_their_layout_offline(hub_id, tmp_path, monkeypatch):
    import datasets

    from ttc_mlops.data import HUB_LAYOUTS

    row, gold, split = HUB_ROWS[hub_id]
    other = {k: (v + " again" if k == HUB_LAYOUTS[hub_id].problem else v) for k, v in row.items() if k != "unique_id"}
    local = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([row, other]).to_parquet(str(local))
    calls = []
    real_load = datasets.load_dataset

    def from_local_file(name, config=None, split=None, **kw):  # the Hub set, read from a file in its layout
        calls.append((name, config, split))
        return real_load("parquet", data_files=str(local), split="train")

    monkeypatch.setattr(datasets, "load_dataset", from_local_file)
    problems = load_dataset_problems(recipe(dataset_name=hub_id))
    layout = HUB_LAYOUTS[hub_id]
    assert calls == [(hub_id, "main" if hub_id == "openai/gsm8k" else None, split)]  # the peers' split and config
    assert [p.problem for p in problems] == [row[layout.problem], row[layout.problem] + " again"]
    assert [p.answer for p in problems] == [gold, gold]  # 142.0 is the integer 142
    assert is_equiv(str(row[layout.answer]).split("#### ")[-1].replace(",", ""), gold)
    assert load_dataset_problems(recipe(dataset_name=str(local)))[0].answer == gold  # the same file, read locally
    load_dataset_problems(recipe(dataset_name=hub_id, dataset_split="validation"))
    assert calls[-1][2] == "validation"  # a split the recipe names is the one read


def test_integer_answers_compare_as_integers():
    assert is_equiv("33", "033") and is_equiv("142.0", "142") and is_equiv("\\boxed{142}", "142")
    assert is_equiv("143", "142") is False and is_equiv("14.2", "142") is False
