import pytest

from ttc_mlops.grading import extract_answer, is_equiv, last_boxed


@pytest.mark.parametrize("pred, gold, expected", [
    ("\\frac{1}{2}", "0.5", True),
    ("5\\sqrt{2}", "\\sqrt{50}", True),
    ("(2, 3)", "(2,3)", True),
    ("[-3, 3]", "[-3,3]", True),
    ("(2,\\infty)", "(2,\\infty)", True),
    ("Wednesday", "\\text{Wednesday}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)", True),
    ("7", "5", False),
    ("(2,3)", "(3,2)", False),
    (None, "5", False),
    ("5", None, None),
])
def test_equivalence(pred, gold, expected):
    assert is_equiv(pred, gold) is expected


def test_extraction():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_answer("Therefore, the final answer is: $42$. I hope it is correct.") == "42"
    assert extract_answer("no answer here") is None


def test_pathological_answer_is_bounded():
    import time

    t = time.time()
    result = is_equiv("9" * 5000 + "^" + "9" * 5000 + "!", "1")
    assert result in (False, None) and time.time() - t < 30
