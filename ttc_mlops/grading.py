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
