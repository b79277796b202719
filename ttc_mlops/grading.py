"""Answer extraction and equivalence, with math-verify, bounded in time and cached.

    python -c "from ttc_mlops.grading import is_equiv; print(is_equiv('\\\\frac{1}{2}', '0.5'))"

Extraction (`extract_answer`) reads a completion as current models write it, in this order:
1. a reasoning model's `<think> ... </think>`: only what follows the last closing tag is read; a
   completion whose thinking never closes has no answer (None);
2. markdown emphasis is dropped (`**6**`, `__6__` read as 6, so `**\\boxed{6}**` is a box);
3. the last `\\boxed{}` (boxes that end the text one after another are joined);
4. after the last box, a "final answer" statement ("the final answer is X", a "Final answer: X"
   line) overrides it; with no box, the last "Answer: X" line or "the answer is X" statement;
5. else what math-verify's own extraction finds in the text (its answer patterns, else the last
   LaTeX or plain expression), so "Therefore, \\(x^3 = 12\\)." or "... is 15." is still read.
Whatever is read loses the math delimiters around it (`\\[ \\]`, `\\( \\)`, `$$ $$`, `$ $`) and a
closing full stop, comma or colon. `boxed_answer` is plain string work (no math-verify import):
the search code uses it to tell a finished step.

Equivalence (`is_equiv`, `equivalent`) is maths first: text is compared only in a conservative
form that keeps every digit, dot and brace (so `3.5` is never `35`, nor `\\frac{1}{12}`
`\\frac{11}{2}`), and matrices, equations, intervals and percentages go to math-verify whole. A
number with units or `\\text{}` words beside it ("12 apples", `5\\text{ inches}`, `30^\\circ`)
compares as the number when the other side is a bare number (MATH's gold answers carry both forms).
Each distinct answer is parsed once and each pair compared once (both cached): grading MATH-500 at
N=256 meets the same few answers again and again. Where math-verify cannot decide (a gold answer it
cannot read, a comparison that times out or fails) the verdict is None, never a guess.
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction

log = logging.getLogger(__name__)

TIMEOUT_S = 5  # per parse / per comparison; a pathological expression cannot hang a run


# --- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_FINAL_ANSWER = re.compile(r"final answer is:?\s*\$?(.+?)\$?(?:\.\s|\.?$|\s*I hope)", re.IGNORECASE | re.DOTALL)


def _boxes(text: str, strict: bool) -> list[tuple[int, int, str]]:
    """(start, end, content) of every `\\boxed{...}` / `\\fbox{...}` with balanced braces; unless
    `strict`, also the brace-less `\\boxed 5` form (its content: the rest of its formula)."""
    found = []
    for m in _BOXED.finditer(text):
        body_at = m.end()
        while text.startswith(" ", body_at):
            body_at += 1
        if text.startswith("{", body_at):
            depth = 0
            for j in range(body_at, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    found.append((m.start(), j + 1, text[body_at + 1 : j].strip()))
                    break
        elif not strict and body_at > m.end():  # "\boxedx" is no box: a space must follow the command
            formula = re.split(r"\$|\\\]|\\\)|\n", text[body_at:], maxsplit=1)[0].strip()
            if formula:
                found.append((m.start(), body_at + len(formula), formula))
    return found


# What may stand between boxes that together give one answer: "\boxed{-2} and \boxed{1}".
# "or" is not among them: "\boxed{15\frac{39}{40}} or \boxed{\frac{639}{40}}" are one answer twice.
_BETWEEN_BOXES = re.compile(r"(?:\s|\$|,|;|&|\\[()\[\]]|\\q?quad|\\text\{\s*(?:and|,)?\s*\}|\band\b)*")


def boxed_answer(text: str, strict: bool = False) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; boxes that end
    the text one after another ("\\boxed{-2} and \\boxed{1}") are joined with commas. Unless
    `strict`, also the brace-less form `\\boxed 5` / `$\\boxed \\frac{6}{2}$`: the rest of its
    formula. `strict` is what ends a search step: a step that merely mentions \\boxed does not."""
    boxes = _boxes(text, strict)
    if strict:
        return boxes[-1][2] if boxes else None
    return _joined(text, boxes)


def _joined(text: str, boxes: list[tuple[int, int, str]]) -> str | None:
    """The last box's content, with the boxes right before it that only connectors separate."""
    if not boxes:
        return None
    run = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        if not _BETWEEN_BOXES.fullmatch(text[box[1] : run[0][0]]):
            break
        run.insert(0, box)
    return ", ".join(content for _, _, content in run)


# Markdown emphasis around a span: never `x**2`, `\\__`, nor a subscript's single underscore.
# (The literal comes first and the look-behind after it, so a search skips to each `**` / `__`.)
_BOLD = re.compile(r"\*\*(?<![\w*]\*\*)(?=\S)(.+?)(?<=\S)\*\*(?![\w*])", re.DOTALL)
_UNDERSCORES = re.compile(r"__(?<![\w\\]__)(?=\S)(.+?)(?<=\S)__(?!\w)", re.DOTALL)
# "Final Answer: 6" / "Answer: 6" at the start of a line (markdown headings and list marks allowed).
_ANSWER_LINE = re.compile(r"^[ \t#>*-]*(final\s+)?answer\s*[:：][ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
# "the answer is X", "would be: X", "is actually X": the filler adverb is not part of the answer
_ANSWER_IS = re.compile(r"\banswer\s+(?:is|(?:would|will|should)\s+be)\s*:?\s*"
                        r"(?:(?:actually|simply|just|then|therefore|thus|now|clearly|indeed)\s+)?"
                        r"(.+?)(?:\.(?=\s|$)|\n|$)", re.IGNORECASE | re.DOTALL)
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}")  # two words: a sentence, not a formula
_DELIMITERS = (("\\[", "\\]"), ("\\(", "\\)"), ("$$", "$$"), ("$", "$"))


def _after_thinking(completion: str) -> str | None:
    """What follows a reasoning model's last `</think>`; None where its thinking never closes.
    (A chat template may open `<think>` in the prompt: then only the closing tag is in the text.)"""
    if "think>" not in completion:
        return completion
    closed = completion.rfind("</think>")
    if completion.find("<think>", closed + 1 if closed >= 0 else 0) >= 0:
        return None  # thinking (re)opened and never closed: no answer yet
    return completion[closed + len("</think>"):] if closed >= 0 else completion


def _clean(answer: str) -> str:
    """An extracted answer without the math delimiters around it, a closing full stop (comma,
    colon) and an unmatched closing bracket."""
    text = answer.strip()
    while True:
        stripped = text.rstrip(" .,;:。").strip()
        if stripped.endswith(")") and stripped.count(")") > stripped.count("(") + stripped.count("["):
            stripped = stripped[:-1]  # "(35 + 70 = 105).": the sentence's bracket, not the answer's
        for left, right in _DELIMITERS:
            if stripped.startswith(left) and stripped.endswith(right) and len(stripped) >= len(left) + len(right):
                inner = stripped[len(left): len(stripped) - len(right)]
                if left != "$" or "$" not in inner:  # "$1$ and $2$" is two formulas, not one
                    stripped = inner.strip()
                    break
        if stripped == text:
            return text
        text = stripped


def _line_content(text: str, m: re.Match) -> str:
    """An "Answer:" line's answer: the rest of its line, or the display math that opens there
    ("Final Answer:" then `\\[`, the formula and `\\]` on lines of their own), or the next line."""
    content = m.group(2).strip()
    rest = text[m.start(2):].lstrip()
    for left, right in (("\\[", "\\]"), ("$$", "$$")):
        close = rest.find(right, len(left)) if rest.startswith(left) else -1
        if close >= 0:
            return rest[: close + len(right)]
    return content or rest.split("\n", 1)[0]


def _stated(text: str, boxes: list[tuple[int, int, str]]) -> str | None:
    """The answer a statement gives: a "final answer" one after the last box, or with no box the
    last "Answer:" line or "the answer is" statement."""
    if "answer" not in text.lower():
        return None
    finals = [(m.start(), m.group(1)) for m in _FINAL_ANSWER.finditer(text)]
    lines = [(m.start(), m.group(1), _line_content(text, m)) for m in _ANSWER_LINE.finditer(text)]
    finals += [(start, content) for start, final, content in lines if final]
    others = [(start, content) for start, final, content in lines if not final]
    others += [(m.start(), m.group(1)) for m in _ANSWER_IS.finditer(text)] if not boxes else []
    last_box = boxes[-1][0] if boxes else -1
    candidates = [c for c in finals if c[0] > last_box] or ([] if boxes else others)
    for _, content in sorted(candidates, reverse=True):
        content = content.replace('\\"', "").strip()  # "\\"$12$ and $13$\\"": the quotes are not the answer
        if _FINAL_ANSWER.search(content):  # "Final Answer: The final answer is $6$": the inner statement
            content = _FINAL_ANSWER.search(content).group(1)
        answer = boxed_answer(content)
        if answer is None and _PROSE.search(_TEXT_WRAPPER.sub("", content)):  # "The largest $n$ is 34."
            answer = _math_verify_extraction(content)
        answer = _clean(answer or content)
        if answer:
            return answer
    return None


def extract_answer(completion: str) -> str | None:
    """The answer a completion gives, or None (the order is the module docstring's): after any
    `</think>`, emphasis dropped: the last boxed answer, or a final-answer statement after it, else
    an "Answer:" line or "the answer is" statement, else whatever math-verify extracts."""
    text = _after_thinking(completion)
    if text is None:
        return None
    if "**" in text:
        text = _BOLD.sub(r"\1", text)
    if "__" in text:
        text = _UNDERSCORES.sub(r"\1", text)
    boxes = _boxes(text, strict=False)
    answer = _stated(text, boxes) or _joined(text, boxes)
    if answer is None:
        answer = _math_verify_extraction(text)
        answer = _clean(answer) if answer else None
    return answer or None


@functools.lru_cache(maxsize=1 << 16)
def _math_verify_extraction(text: str) -> str | None:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    try:
        parsed = parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                       parsing_timeout=TIMEOUT_S)
    except Exception as err:  # math-verify raises on timeouts and odd LaTeX alike
        log.debug("no answer extracted from %r: %s", text[-200:], err)
        return None
    return parsed[1].strip() or None if len(parsed) > 1 and isinstance(parsed[1], str) else None


# --- equivalence

@functools.lru_cache(maxsize=1 << 18)
def parse_answer(answer: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    try:
        return tuple(parse(f"\\boxed{{{answer}}}", extraction_config=configs, parsing_timeout=TIMEOUT_S))
    except Exception as err:  # math-verify raises on timeouts and odd LaTeX alike
        log.debug("could not parse %r: %s", answer, err)
        return ()


def readable(answer: str) -> bool:
    """math-verify reads the answer as maths (not only as its own text)."""
    return any(not isinstance(x, str) for x in parse_answer(answer))


def _non_finite(expr) -> bool:
    if not getattr(expr, "is_number", False):
        return False
    try:
        z = complex(expr.doit().evalf(15))
    except (TypeError, ValueError, ArithmeticError):
        return True
    return not (_finite(z.real) and _finite(z.imag))


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# Sizing and spacing commands; `\ ` only where it is not the second half of a `\\` row break.
_SPACING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])|(?<!\\)\\[!,;: ]|\\?\$")


def canonical_text(answer: str) -> str:
    """The answer as text, without what never changes its meaning (text wrappers, sizing, spacing,
    dollar signs, case, a closing full stop). Digits, dots, braces and backslash commands stay:
    this form decides only that two answers are written the same."""
    text = _TEXT_WRAPPER.sub(r"\1", answer)
    text = _SPACING.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", text).lower().rstrip(".")



@functools.lru_cache(maxsize=1 << 20)
def is_equiv(pred: str | None, gold: str | None) -> bool | None:
    """True / False; None when it cannot be decided (a gold answer math-verify cannot read as
    maths, a comparison that timed out or failed)."""
    if gold is None:
        return None
    if pred is None:
        return False
    if canonical_text(pred) == canonical_text(gold):
        return True
    decided = _by_form(pred, gold)
    if decided is not None:
        return decided
    gold_parsed = parse_answer(gold)
    if not readable(gold):
        return None
    pred_parsed = parse_answer(pred)
    if not pred_parsed:
        return False
    if any(_non_finite(x) for x in gold_parsed[:1] + pred_parsed[:1]):
        return False  # 1:00 and 12:00 are both "zoo" to math-verify: their texts differed above
    from math_verify import verify

    try:
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=TIMEOUT_S, raise_on_error=True))
    except Exception as err:
        log.debug("could not compare %r with %r: %s", pred, gold, err)
        return None


_BASE = re.compile(r"^([0-9A-Za-z]+)_\{?(\d+)\}?$")  # 52_8, 4210_{5}: a numeral in base 8, 5


# Units and words beside a number: `\\text{ cm}`, " square feet" (2+ letters a word: "2 x" is no unit),
# degrees, a currency sign.
_TEXT_WORDS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .\-]*\}")
_WORDS_AFTER = re.compile(r"(?:\s+[A-Za-z][A-Za-z\-]+\.?)+\s*$")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|^\\?\$")


def _number_beside_words(answer: str) -> Fraction | None:
    """The number an answer gives with units or `\\text{}` words beside it ("12 apples",
    `5\\text{ inches}`, `30^\\circ`, `\\$4`); None unless exactly one plain number remains
    (never a percentage: 10\\% is 10 and 0.1)."""
    if "%" in answer:
        return None
    text = _WORDS_AFTER.sub("", _TEXT_WORDS.sub(" ", _DEGREES.sub("", answer.strip()))).strip()
    if text == answer.strip() or re.search(r"\d\s+\d", text):  # nothing beside it, or two numbers
        return None
    return plain_number(tidy(text))


def _by_form(pred: str, gold: str) -> bool | None:
    """Verdicts that the written form decides before math-verify, which would round or drop it:
    numerals with a base subscript (math-verify reads 52_8 and 52_9 alike) and two plain numbers
    (compared exactly, up to the rounding of a decimal written to 6+ significant digits, where
    math-verify rounds to 6 decimal places: .0000672 is not .0000673), one of them perhaps with
    units or words beside it."""
    bp, bg = _BASE.match(pred.replace(" ", "")), _BASE.match(gold.replace(" ", ""))
    if bp and bg:
        return bp.group(1).upper() == bg.group(1).upper() and int(bp.group(2)) == int(bg.group(2))
    if bp or bg:  # a base on one side only: the numerals must agree (the base is the question's)
        digits = (bp or bg).group(1).upper()
        other = canonical_text(gold if bp else pred).upper()
        return digits == other if other.isalnum() else None
    x, y = plain_number(tidy(pred)), plain_number(tidy(gold))
    if (x is None) != (y is None):  # a bare number against one with units or words beside it
        x, y = (x, _number_beside_words(gold)) if x is not None else (_number_beside_words(pred), y)
    if x is None or y is None:
        return None
    return x == y or abs(x - y) <= Fraction(1, 10**6) * max(abs(x), abs(y))


# --- canonical keys: one parse per distinct answer, plain numbers without math-verify

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRAC = re.compile(r"^([+-]?)\\[dt]?frac(?:\{([+-]?\d+)\}\{(\d+)\}|(\d)(\d))$")
_SLASH = re.compile(r"^([+-]?\d+)/(\d+)$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def plain_number(answer: str) -> Fraction | None:
    """The exact value of an integer, decimal (thousands separated or not: 32,348 or 32{,}348) or
    simple fraction; None for anything else."""
    text = answer.strip().replace("$", "").replace("{,}", ",")
    if _THOUSANDS.match(text):  # "32, 349" (a space after the comma) is a pair, not a number
        text = text.replace(",", "")
    text = text.replace(" ", "")
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


_WRAPPED = re.compile(r"^\(([^(),]*)\)$")  # "(5)", but never a tuple or an interval


def tidy(answer: str) -> str:
    """The same answer without sizing, spacing and wrapper notation, so that forms which differ only
    in those share one parse (and plain numbers skip math-verify). Structure stays: a `\\\\` row
    break, an equation's sides, a percent sign."""
    text = re.sub(r",\\!\s*", "{,}", answer)  # 32,\\!348: a thousands separator, never a list
    text = _SPACING.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"(?<!\\)\\$", "", " ".join(text.split()))  # a stray closing backslash: "185\\"
    return _WRAPPED.sub(r"\1", text).strip()


@functools.lru_cache(maxsize=1 << 18)  # a pure function of the text: a process that grades the same texts again (another evaluate, the tests) reuses it
def answer_key(answer: str) -> tuple:
    """A canonical form of an answer, from one parse: ("num", re, im) for finite numbers (12
    significant digits), ("base", digits, base) for numerals such as 52_8, ("expr", sympy text) for
    other parsed expressions, ("text", canonical text) otherwise (text, and values such as 1:00 that math-verify reads as infinite). Equal keys
    are equivalent answers; different keys may still be (see `equivalent`)."""
    answer = tidy(answer)
    value = plain_number(answer)
    if value is not None:
        return ("num", f"{float(value):.12g}", "0")
    base = _BASE.match(answer.replace(" ", ""))
    if base:  # a numeral in another base: its digits and base, never its digits read in base 10
        return ("base", base.group(1).upper(), str(int(base.group(2))))
    parsed = parse_answer(answer)  # math-verify, cached per distinct answer
    expr = parsed[0] if parsed else None
    if expr is None or isinstance(expr, str):
        return ("text", canonical_text(answer))
    if getattr(expr, "is_number", False):
        if _non_finite(expr):
            return ("text", canonical_text(answer))  # zoo, nan, oo: their text says which
        try:
            z = complex(expr.evalf(15))
        except (TypeError, ValueError, ArithmeticError):  # unevaluated, e.g. 10\% = 10*(1/100): its own key
            return ("expr", str(expr))
        return ("num", f"{z.real:.12g}", f"{z.imag:.12g}")
    return ("expr", str(expr))


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def equivalent(a: str, b: str, keys: dict[str, tuple]) -> bool | None:
    """Whether answers `a` and `b` (gold or not) are equivalent; None where undecided. Decided by
    the keys where they suffice (equal keys; numbers far apart; a number against an expression with
    symbols; text against maths), by math-verify (`is_equiv`, cached by pair) for the rest:
    expressions, sets, intervals, matrices, equations, percentages and numbers within rounding."""
    ka, kb = keys[a], keys[b]
    if ka == kb or canonical_text(a) == canonical_text(b):
        return True
    if (ka[0] == "num") != (kb[0] == "num"):  # a number against one with units or words beside it?
        decided = _by_form(a, b)
        if decided is not None:
            return decided
    if "%" in a + b or "Eq(" in ka[-1] + kb[-1]:  # 10\% is 10 and 0.1; "x = 5" is 5 to math-verify
        return is_equiv(tidy(a), tidy(b))
    if "text" in (ka[0], kb[0]):  # written differently, and not both maths
        return None if not readable(tidy(b)) else False  # `b` (the gold answer) unreadable: undecided
    if {ka[0], kb[0]} == {"num", "expr"}:  # a number against an expression with symbols
        return False
    if ka[0] == kb[0] == "num":
        x, y = complex(float(ka[1]), float(ka[2])), complex(float(kb[1]), float(kb[2]))
        if abs(x - y) > 1e-6 * max(abs(x), abs(y)):  # relative: .0000672 is not .0000673
            return False
    return is_equiv(tidy(a), tidy(b))
