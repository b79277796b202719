"""Answer extraction and equivalence, with math-verify, bounded in time and cached.

    python -c "from ttc_mlops.grading import is_equiv; print(is_equiv('\\\\frac{1}{2}', '0.5'))"

`extract_answer` is plain string work (no math-verify import), so search code can call it.
`is_equiv` parses each distinct answer once and caches each (answer, gold) pair: grading MATH-500
at N=256 meets the same few answers again and again.
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction

log = logging.getLogger(__name__)

TIMEOUT_S = 5  # per parse / per comparison; a pathological expression cannot hang a run

_FINAL_ANSWER = re.compile(r"final answer is:?\s*\$?(.+?)\$?(?:\.\s|\.?$|\s*I hope)", re.IGNORECASE | re.DOTALL)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        rest = text[start:].split("$")[0]  # "\boxed 5"
        parts = rest.split(None, 1)
        return parts[1].strip() if len(parts) > 1 else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def extract_answer(completion: str) -> str | None:
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    match = None
    for match in _FINAL_ANSWER.finditer(completion):
        pass
    return match.group(1).strip() if match else None


@functools.lru_cache(maxsize=1 << 18)
def parse_answer(answer: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    try:
        return tuple(parse(f"\\boxed{{{answer}}}", extraction_config=configs, parsing_timeout=TIMEOUT_S))
    except Exception as err:  # math-verify raises on timeouts and odd LaTeX alike
        log.debug("could not parse %r: %s", answer, err)
        return ()


def normalise_text(answer: str) -> str:
    answer = re.sub(r"\\text\{(.*?)\}", r"\1", answer)
    return re.sub(r"[\s$\\{}.]", "", answer).lower()


@functools.lru_cache(maxsize=1 << 20)
def is_equiv(pred: str | None, gold: str | None) -> bool | None:
    """True / False, or None when the gold answer cannot be parsed (counted, not crashed on)."""
    if gold is None:
        return None
    if pred is None:
        return False
    if normalise_text(pred) == normalise_text(gold):
        return True
    gold_parsed = parse_answer(gold)
    if not gold_parsed:
        return None
    pred_parsed = parse_answer(pred)
    if not pred_parsed:
        return False
    from math_verify import verify

    try:
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=TIMEOUT_S))
    except Exception as err:
        log.debug("could not compare %r with %r: %s", pred, gold, err)
        return False


# --- canonical keys: one parse per distinct answer, plain numbers without math-verify

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRAC = re.compile(r"^([+-]?)\\[dt]?frac(?:\{([+-]?\d+)\}\{(\d+)\}|(\d)(\d))$")
_SLASH = re.compile(r"^([+-]?\d+)/(\d+)$")


def plain_number(answer: str) -> Fraction | None:
    """The exact value of an integer, decimal or simple fraction; None for anything else."""
    text = answer.replace(" ", "").replace("$", "")
    try:
        if _NUMBER.match(text):
            return Fraction(text)
        m = _FRAC.match(text)
        if m:
            num, den = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
            value = Fraction(int(num), int(den))
            return -value if m.group(1) == "-" else value
        m = _SLASH.match(text)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except ZeroDivisionError:
        return None
    return None


_SIZING = re.compile(r"\\(left|right)(?![A-Za-z])|\\[!,;: ]|\\?\$")
_ASSIGN = re.compile(r"^[A-Za-z]\s*=\s*(?=[^=]+$)")  # "x = 5": math-verify reads it as 5 too
_WRAPPED = re.compile(r"^\(([^(),]*)\)$")  # "(5)", but never a tuple or an interval


def tidy(answer: str) -> str:
    """The same answer without sizing, spacing and wrapper notation, so that forms which differ only
    in those share one parse (and plain numbers skip math-verify)."""
    text = _SIZING.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = " ".join(text.split())
    text = _ASSIGN.sub("", text)
    return _WRAPPED.sub(r"\1", text).strip()


def answer_key(answer: str) -> tuple:
    """A canonical form of an answer, from one parse: ("num", re, im) for numbers (12 significant
    digits), ("expr", sympy text) for other parsed expressions, ("text", normalised) otherwise.
    Equal keys are equivalent answers."""
    answer = tidy(answer)
    value = plain_number(answer)
    if value is None:
        parsed = parse_answer(answer)  # math-verify, cached per distinct answer
        expr = parsed[0] if parsed else None
        if expr is None or isinstance(expr, str):
            return ("text", normalise_text(answer))
        if getattr(expr, "is_number", False):
            try:
                z = complex(expr.evalf(15))
                return ("num", f"{z.real:.12g}", f"{z.imag:.12g}")
            except (TypeError, ValueError, ArithmeticError):
                pass
        return ("expr", str(expr))
    return ("num", f"{float(value):.12g}", "0")


def equivalent(a: str, gold: str, keys: dict[str, tuple]) -> bool:
    """`a` is equivalent to `gold`. Decided by the keys where they suffice (equal keys; numbers far
    apart; a number against an expression with symbols; text math-verify cannot read), by
    math-verify (grading.is_equiv, cached by pair) for the rest: expressions, sets, intervals,
    matrices, percentages and numbers within rounding of each other."""
    ka, kg = keys[a], keys[gold]
    if ka == kg or normalise_text(a) == normalise_text(gold):
        return True
    if "%" in a + gold or "Eq(" in ka[-1] + kg[-1]:  # 10\% is 10 and 0.1; "2x=5" is 5 to math-verify
        return bool(is_equiv(tidy(a), tidy(gold)))
    if ka[0] == "text" or {ka[0], kg[0]} == {"num", "expr"}:  # unreadable, or a number against symbols
        return False
    if ka[0] == kg[0] == "num":
        x, y = complex(float(ka[1]), float(ka[2])), complex(float(kg[1]), float(kg[2]))
        if abs(x - y) > 1e-4 * max(abs(x), abs(y), 1.0):  # close calls go to math-verify's rounding
            return False
    return bool(is_equiv(tidy(a), tidy(gold)))
