"""Rebuild format_cases.jsonl from two peers' published answer-format tests (strings kept exactly).

    git -C lighteval show 3fd15266bc8448b797e61462d293aa3fd40b3580:tests/unit/metrics/test_extractive_match.py > le.py
    git -C rllm show 9beb6e0f676a46d38858991fd79ac5f8e0b16d4c:tests/rewards/test_math_reward.py > rllm.py
    python tests/data/grading/build_format_cases.py le.py rllm.py

- huggingface/lighteval (MIT): every `pytest.mark.parametrize` case of test_extractive_match.py,
  read by importing the file with its lighteval imports stubbed out, minus the cases that
  peer_cases.jsonl (or its excluded list) already holds: huggingface/Math-Verify's tests were
  copied from this file, so most cases are there already, with the same strings.
- rllm-org/rllm (Apache-2.0): the single-gold-answer cases of test_math_reward.py (completions of
  reasoning models: `<think> ... </think>` then the answer), quoted below and checked to appear in
  the file verbatim.
Cases of conventions this grader does not take go to format_cases_excluded.jsonl with a `why`.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIGHTEVAL = "huggingface/lighteval tests/unit/metrics/test_extractive_match.py"
RLLM = "rllm-org/rllm tests/rewards/test_math_reward.py"

# (test, model_response, ground_truth, is_correct) as test_math_reward.py asserts them
RLLM_CASES = [
    ("test_correct_answer_simple", "<think>2 + 2 = 4</think>\\nThe answer is \\\\boxed{4}.", "4", True),
    ("test_incorrect_answer", "<think>2 + 2 = 5</think>\\nThe answer is \\\\boxed{5}.", "4", False),
    ("test_toolcall_bonus", "<think>I'll use calculation tools</think>\\nThe answer is \\\\boxed{4}.", "4", True),
    ("test_complex_mathematical_expression",
     "<think>Let me solve this quadratic equation</think>\\nThe answer is \\\\boxed{x = 2, x = -3}.", "x = 2, x = -3", True),
    ("test_answer_with_latex_in_ground_truth",
     "<think>Let me calculate this carefully</think>\\nThe answer is \\\\boxed{24}.", "\\\\boxed{24}", True),
    ("test_numerical_tolerance",
     "<think>The answer is approximately pi</think>\\nThe answer is \\\\boxed{3.14159}.", "3.14159", True),
    ("test_fraction_equivalence",
     "<think>Let me simplify this fraction</think>\\nThe answer is \\\\boxed{\\\\frac{1}{2}}.", "1/2", True),
    ("test_custom_config_values", "<think>5 + 5 = 10</think>\\nThe answer is \\\\boxed{10}.", "10", True),
    ("test_custom_config_values", "<think>5 + 5 = 11</think>\\nThe answer is \\\\boxed{11}.", "10", False),
]
RLLM_EXCLUDED = [
    ("test_format_error_no_delimiter", "The answer is 4.", "4", False,
     "peer convention: rllm rewards only completions that hold a </think> (a format rule, not the answer's value)"),
    ("test_format_error_no_boxed_answer", "<think>2 + 2 = 4</think>\\nThe answer is 4.", "4", False,
     "peer convention: rllm reads only a boxed answer; 'The answer is 4.' states 4"),
    ("test_custom_config_values", "The answer is 10.", "10", False,
     "peer convention: rllm rewards only completions that hold a </think> (a format rule, not the answer's value)"),
]


def _python_literal(text: str) -> str:
    return json.loads(f'"{text}"')  # the cases above are written as in the peer's source


def lighteval_cases(path: Path) -> list[dict]:
    """Every parametrized case of the peer file, its lighteval imports replaced by stand-ins."""
    class Language(enum.Enum):  # the few languages the file names
        ENGLISH, FRENCH, CHINESE, ARABIC, HINDI = "en", "fr", "zh", "ar", "hi"

    class Anything:
        def __init__(self, *a, **k):
            pass

        def __getattr__(self, name):
            return Anything()

        def __call__(self, *a, **k):
            return Anything()

    names = ["lighteval", "lighteval.metrics", "lighteval.metrics.dynamic_metrics", "lighteval.metrics.utils",
             "lighteval.metrics.utils.extractive_match_utils", "lighteval.metrics.utils.math_comparison",
             "lighteval.models", "lighteval.models.model_output", "lighteval.tasks", "lighteval.tasks.requests",
             "lighteval.utils", "lighteval.utils.language", "sympy"]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for name in names:
            module = types.ModuleType(name)
            module.__path__ = []
            module.__getattr__ = lambda n: Language if n == "Language" else Anything
            sys.modules[name] = module
        spec = importlib.util.spec_from_file_location("peer_extractive_match", path)
        peer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    cases = []
    for test, fn in vars(peer).items():
        for mark in getattr(fn, "pytestmark", []) if test.startswith("test_") else []:
            if mark.name != "parametrize":
                continue
            argnames = [n.strip() for n in mark.args[0].split(",")]
            for values in mark.args[1]:
                row = dict(zip(argnames, getattr(values, "values", values)))
                cases.append({"test": test, **{k: v.name if isinstance(v, Language) else v for k, v in row.items()}})
    return cases


def main(lighteval_file: str, rllm_file: str) -> None:
    known = set()
    for name in ("peer_cases.jsonl", "peer_cases_excluded.jsonl"):
        known |= {(c["gold"], c["pred"]) for c in map(json.loads, (HERE / name).read_text().splitlines())}
    included, excluded = [], []
    for c in lighteval_cases(Path(lighteval_file)):
        if (c["gold"], c["pred"]) in known:
            continue
        case = {"source": f"{LIGHTEVAL}::{c['test']}", "gold": c["gold"], "pred": c["pred"], "equal": bool(c["expected"])}
        if "abc" in c["test"]:
            excluded.append({**case, "why": "multiple-choice letter extraction (NativeLetters): not a maths answer"})
        elif c.get("precision", 6) != 6:
            excluded.append({**case, "why": f"peer option precision={c['precision']}: this grader compares at 6 digits"})
        else:
            included.append({**case, **({"language": c["language"]} if c.get("language") else {})})
    source = Path(rllm_file).read_text()
    for test, response, gold, equal, *why in RLLM_CASES + RLLM_EXCLUDED:
        if response not in source or f'"ground_truth": "{gold}"' not in source:
            raise SystemExit(f"{test}: {response!r} / {gold!r} not found verbatim in {rllm_file}")
        case = {"source": f"{RLLM}::{test}", "gold": _python_literal(gold), "pred": _python_literal(response), "equal": equal}
        (excluded.append({**case, "why": why[0]}) if why else included.append(case))
    for name, rows in (("format_cases.jsonl", included), ("format_cases_excluded.jsonl", excluded)):
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{name}: {len(rows)} cases")


if __name__ == "__main__":
    main(*sys.argv[1:3])
