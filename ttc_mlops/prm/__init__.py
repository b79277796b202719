"""Process reward models: a score in [0, 1] for every step of every completion.

    python -c "from ttc_mlops.prm import split_steps; print(split_steps('a\\n\\nb\\n\\n'))"

A step ends at a blank line. A partial solution ends in the delimiter, so the split drops the
empty tail rather than scoring an empty turn (a defect of the reference implementation).
"""

from __future__ import annotations

import math
from typing import Protocol

from ..config import STEP_DELIMITER

AGGREGATIONS = ("last", "min", "prod", "mean")


class PRM(Protocol):
    name: str
    params: int | None  # parameters one token's forward multiplies by; None: unknown
    tokens_processed: int  # input tokens run so far (prefix reuse and score caching spare some)
    tokens_full: int  # every token of every sequence asked for so far, as if nothing were reused

    def clear_cache(self) -> None:
        """Forget every score and prefix kept between calls."""

    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[list[float]]]:
        """Per problem, per completion, per step: P(step is correct) in [0, 1]."""


def split_steps(completion: str) -> list[str]:
    steps = [s for s in completion.split(STEP_DELIMITER)]
    while steps and not steps[-1].strip():
        steps.pop()
    return [s for s in steps if s.strip()] or [completion]


def aggregate(step_scores: list[float], how: str) -> float:
    if not step_scores:
        return 0.0
    if how == "last":
        return step_scores[-1]
    if how == "min":
        return min(step_scores)
    if how == "prod":
        return math.prod(step_scores)
    if how == "mean":
        return sum(step_scores) / len(step_scores)
    raise ValueError(f"agg_strategy={how!r} is not one of {AGGREGATIONS}")


def load_prm(settings) -> PRM:
    """The PRM of a recipe's `prm_settings`, its family looked up from the path unless named."""
    from .families import prm_class

    return prm_class(settings.path, settings.family)(settings)
