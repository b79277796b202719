"""Problems: from the Hub, a local file, or a built-in set; stable ids; slices and chunks.

    python -c "from ttc_mlops.data import builtin_problems; print(len(builtin_problems()))"

The problem set of a recipe is the dataset, cut to its first `num_samples` rows; a process then
handles either `dataset_start:dataset_end` of it or chunk `chunk` of `num_chunks` (equal-sized up to
one row, covering every row exactly once). A problem's id is the data's `unique_id` where it has
one, else `<dataset>/<row index>`: never the text, so duplicate problems do not collide.

Built in (no Hub needed): `builtin:math-mini` (a few dozen easy problems), `builtin:math500`
(MATH-500) and `builtin:gsm8k` (GSM8K's 1,319 test problems, the gold answer the number after
`####`). The AIME 2024 / 2025 and AMC 2023 sets on the Hub are read by the columns and split the
peers use (`HUB_LAYOUTS`); an answer stored as a float such as 142.0 is the integer 142.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from .config import BUILTIN_DATASET, BUILTIN_MATH500, Recipe, RecipeError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# MATH-500 as published with "Let's Verify Step by Step" (openai/prm800k, MIT; the same 500 rows as
# HuggingFaceH4/MATH-500): problem, solution, answer, subject, level, unique_id.
MATH500_FILE = Path(__file__).resolve().parent / "builtin" / "math500.jsonl.gz"
# GSM8K's test split (openai/grade-school-math, MIT; the same 1,319 rows as openai/gsm8k "main"):
# question, answer (the worked solution, then "#### <number>").
GSM8K_FILE = Path(__file__).resolve().parent / "builtin" / "gsm8k_test.jsonl.gz"
BUILTIN_GSM8K = "builtin:gsm8k"
# The benchmarks shipped in the package, by name: their file and the label of their problem ids.
BUILTIN_FILES = {BUILTIN_MATH500: (MATH500_FILE, "math500"), BUILTIN_GSM8K: (GSM8K_FILE, "gsm8k")}


@dataclass(frozen=True)
class HubLayout:
    split: str  # the split the peers evaluate
    problem: str  # the column holding the problem text
    answer: str  # the column holding the gold answer
    config: str | None = None  # the dataset config, where it has several


# Benchmarks people report beside MATH-500, by Hub id, as the peers load them (lighteval, open-r1,
# Qwen2.5-Math, NeMo-Skills): the split and the columns of the problem and its gold answer. The
# AIME and AMC sets have one split ("train" for some): the recipe's default "test" reads it. Any
# other Hub id or local file is read by the usual column names (problem / question, answer).
HUB_LAYOUTS = {
    "HuggingFaceH4/MATH-500": HubLayout("test", "problem", "answer"),
    "openai/gsm8k": HubLayout("test", "question", "answer", config="main"),
    "HuggingFaceH4/aime_2024": HubLayout("train", "problem", "answer"),  # AIME 2024 I and II: 30
    "Maxwell-Jia/AIME_2024": HubLayout("train", "Problem", "Answer"),
    "yentinglin/aime_2025": HubLayout("train", "problem", "answer"),  # AIME 2025 I and II: 30
    "math-ai/aime25": HubLayout("test", "problem", "answer"),
    "AI-MO/aimo-validation-amc": HubLayout("train", "problem", "answer"),  # AMC 12 2022-23: 83, answers as floats
    "math-ai/amc23": HubLayout("test", "question", "answer"),  # AMC 2023: 40
}
_PROBLEM_FIELDS = ("problem", "question", "Problem", "Question")
_ANSWER_FIELDS = ("answer", "Answer")


@dataclass(frozen=True)
class Problem:
    problem_id: str
    problem: str
    answer: str | None  # gold answer, as written in the data
    level: int | None = None
    subject: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A few dozen problems with MATH-style answers of every common form (integers, fractions,
# radicals, tuples, intervals, text), small enough for a 135M model to get some right.
_BUILTIN: list[tuple[str, str, int, str]] = [
    ("What is $2 + 3$?", "5", 1, "Prealgebra"),
    ("What is $7 \\times 8$?", "56", 1, "Prealgebra"),
    ("What is $100 - 37$?", "63", 1, "Prealgebra"),
    ("Compute $12 \\div 4$.", "3", 1, "Prealgebra"),
    ("What is $3^4$?", "81", 1, "Prealgebra"),
    ("Solve for $x$: $x + 7 = 12$.", "5", 1, "Algebra"),
    ("Solve for $x$: $3x = 27$.", "9", 1, "Algebra"),
    ("What is $\\frac{1}{2} + \\frac{1}{3}$? Express your answer as a common fraction.", "\\frac{5}{6}", 2, "Prealgebra"),
    ("What is $\\frac{3}{4} \\cdot \\frac{2}{9}$? Express your answer as a common fraction.", "\\frac{1}{6}", 2, "Prealgebra"),
    ("What is $0.25$ written as a common fraction in lowest terms?", "\\frac{1}{4}", 1, "Prealgebra"),
    ("Simplify $\\sqrt{50}$.", "5\\sqrt{2}", 2, "Algebra"),
    ("Simplify $\\sqrt{12}$.", "2\\sqrt{3}", 2, "Algebra"),
    ("What is the length of the hypotenuse of a right triangle with legs $1$ and $1$?", "\\sqrt{2}", 2, "Geometry"),
    ("What is the sum of the interior angles of a triangle, in degrees?", "180", 1, "Geometry"),
    ("What is the area of a rectangle with side lengths $6$ and $7$?", "42", 1, "Geometry"),
    ("What is the perimeter of a square with side length $9$?", "36", 1, "Geometry"),
    ("What is the midpoint of the segment from $(0,0)$ to $(4,6)$? Give your answer as an ordered pair.", "(2,3)", 2, "Algebra"),
    ("Solve the system $x + y = 5$, $x - y = 1$. Give your answer as an ordered pair $(x,y)$.", "(3,2)", 2, "Algebra"),
    ("Solve the inequality $2x - 4 > 0$. Express your answer in interval notation.", "(2,\\infty)", 3, "Algebra"),
    ("For which $x$ is $x^2 \\le 9$? Express your answer in interval notation.", "[-3,3]", 3, "Algebra"),
    ("What is the greatest common divisor of $12$ and $18$?", "6", 1, "Number Theory"),
    ("What is the least common multiple of $4$ and $6$?", "12", 1, "Number Theory"),
    ("What is the remainder when $17$ is divided by $5$?", "2", 1, "Number Theory"),
    ("How many positive divisors does $12$ have?", "6", 2, "Number Theory"),
    ("What is the smallest prime number greater than $20$?", "23", 1, "Number Theory"),
    ("How many ways can you arrange the letters of the word CAT?", "6", 2, "Counting & Probability"),
    ("A fair coin is flipped twice. What is the probability of getting two heads? Express your answer as a common fraction.", "\\frac{1}{4}", 2, "Counting & Probability"),
    ("What is $\\binom{5}{2}$?", "10", 2, "Counting & Probability"),
    ("What is the value of $\\sin(90^\\circ)$?", "1", 1, "Precalculus"),
    ("What is $\\log_2 8$?", "3", 2, "Intermediate Algebra"),
    ("Solve for $x$: $x^2 = 16$ with $x > 0$.", "4", 1, "Algebra"),
    ("If $f(x) = 2x + 1$, what is $f(3)$?", "7", 1, "Algebra"),
    ("What is the slope of the line through $(1,2)$ and $(3,6)$?", "2", 2, "Algebra"),
    ("Which day of the week comes two days after Monday?", "\\text{Wednesday}", 1, "Prealgebra"),
    ("Is $15$ even or odd? Answer with the word.", "\\text{odd}", 1, "Number Theory"),
    ("What is $15\\%$ of $200$?", "30", 1, "Prealgebra"),
]


def builtin_problems() -> list[Problem]:
    return [Problem(f"builtin/{i:03d}", p, a, level, subject) for i, (p, a, level, subject) in enumerate(_BUILTIN)]


def is_local_dataset(name: str) -> bool:
    return name.endswith(LOCAL_SUFFIXES) or name.startswith(("/", "./", "../", "~"))


def _gold_answer(row: dict[str, Any], field: str | None = None) -> str | None:
    from .grading import boxed_answer  # light: no math-verify import

    answer = row.get(field) if field else next((row[f] for f in _ANSWER_FIELDS if row.get(f) is not None), None)
    if isinstance(answer, str) and "####" in answer:  # GSM8K: worked solution, then "#### 18"
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    if isinstance(answer, float) and answer.is_integer():  # AMC's 142.0 is the integer 142
        return str(int(answer))
    if answer is not None:
        return str(answer)
    if isinstance(row.get("solution"), str):
        return boxed_answer(row["solution"])
    return None


def _level(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    digits = "".join(c for c in str(value) if c.isdigit())  # MATH writes "Level 3"
    return int(digits) if digits else None


def rows_to_problems(rows: Iterable[dict[str, Any]], label: str, layout: HubLayout | None = None) -> list[Problem]:
    """Problems from rows: their text and gold answer from the layout's columns, else the usual names."""
    problems = []
    for index, row in enumerate(rows):
        fields = (layout.problem,) if layout else _PROBLEM_FIELDS
        text = next((row[f] for f in fields if isinstance(row.get(f), str)), None)
        if text is None:
            raise RecipeError(f"dataset {label!r} row {index} has no " + " or ".join(repr(f) for f in fields)
                              + f" text field (fields: {sorted(row)})")
        problem_id = str(row["unique_id"]) if row.get("unique_id") is not None else f"{label}/{index}"
        subject = row.get("subject", row.get("type"))
        answer = _gold_answer(row, layout.answer if layout else None)
        problems.append(Problem(problem_id, text, answer, _level(row.get("level")), subject))
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise RecipeError(f"dataset {label!r} has duplicate unique_id values: {dupes}")
    return problems


def _read_local(path: Path) -> list[dict[str, Any]]:
    """The rows of a .parquet, .json (an array of objects) or .jsonl(.gz) file, each a JSON object."""
    where = f"dataset_name={str(path)!r}"
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict("records")
        except Exception as err:  # pyarrow raises its own kinds for every way a file can be broken
            raise RecipeError(f"{where} is not a readable parquet file ({type(err).__name__}: {err})") from None
    try:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise RecipeError(f"{where} is not a UTF-8 text file of JSON rows ({err})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{where} is not valid JSON ({err})") from None
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        # JSON Lines ends a row at "\n" only: str.splitlines would also cut at U+2028, U+0085, ... inside a string
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    numbered.append((lineno, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise RecipeError(f"{where}: line {lineno} is not JSON ({err})") from None
    for lineno, row in numbered:
        if not isinstance(row, dict):
            raise RecipeError(f"{where}: row {lineno} is a JSON {type(row).__name__}, expected an object with a "
                              f"'problem' (or 'question') field")
    return [row for _, row in numbered]


def load_dataset_problems(recipe: Recipe) -> list[Problem]:
    """The whole problem set of the recipe (before any chunking)."""
    name = recipe.dataset_name
    if name == BUILTIN_DATASET:
        problems = builtin_problems()
    elif name in BUILTIN_FILES:
        path, label = BUILTIN_FILES[name]
        problems = rows_to_problems(_read_local(path), label)
    elif name.startswith("builtin:"):
        raise RecipeError(f"dataset_name={name!r} is no built-in dataset (built in: "
                          + ", ".join(sorted([BUILTIN_DATASET, *BUILTIN_FILES])) + ")")
    elif is_local_dataset(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise RecipeError(f"dataset_name={name!r}: no such file (expected a local "
                              f".jsonl/.json/.parquet file, a Hub dataset id, or {BUILTIN_DATASET!r})")
        problems = rows_to_problems(_read_local(path), recipe.dataset_label)
    else:
        import datasets

        layout = HUB_LAYOUTS.get(name)
        split, config = recipe.dataset_split, recipe.dataset_config
        if layout is not None:
            split = layout.split if split == Recipe.model_fields["dataset_split"].default else split
            config = config or layout.config
        ds = datasets.load_dataset(name, config, split=split)
        problems = rows_to_problems(ds, recipe.dataset_label, layout)
    if recipe.dataset_levels is not None:
        problems = [p for p in problems if p.level in recipe.dataset_levels]
        if not problems:
            raise RecipeError(f"dataset_levels={recipe.dataset_levels}: {name} has no problem of those levels")
    if recipe.num_samples is not None:
        problems = problems[: recipe.num_samples]
    if not problems:
        raise RecipeError(f"dataset_name={name!r} has no problems")
    return problems


def chunk_bounds(size: int, chunk: int, num_chunks: int) -> tuple[int, int]:
    """Rows [start, end) of chunk `chunk` of `num_chunks`: sizes differ by at most one, none past the end."""
    if num_chunks > size:
        raise RecipeError(f"num_chunks={num_chunks} is larger than the {size} problems of the dataset")
    return chunk * size // num_chunks, (chunk + 1) * size // num_chunks


def row_range(size: int, recipe: Recipe) -> tuple[int, int]:
    """Rows [start, end) of the problem set that this process handles."""
    if recipe.chunk is not None:
        return chunk_bounds(size, recipe.chunk, recipe.num_chunks)
    start = recipe.dataset_start or 0
    if start >= size:
        raise RecipeError(f"dataset_start={start} is past the end of the dataset ({size} problems)")
    end = size if recipe.dataset_end is None else min(recipe.dataset_end, size)
    return start, end
