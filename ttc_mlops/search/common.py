"""What every strategy shares: per-request seeds and turning a problem's candidates into a Record."""

from __future__ import annotations

import hashlib

from ..data import Problem
from ..grading import extract_answer
from ..prm import aggregate
from ..records import Record


def sample_seed(seed: int, problem_id: str, *path: int) -> int:
    """A seed for one request, from the run seed, the problem and the request's place in the search.
    It ignores batch and chunk, so a problem's samples are the same wherever it runs."""
    key = f"{seed}|{problem_id}|" + ".".join(map(str, path))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def make_record(problem: Problem, recipe, completions: list[str], step_scores: list[list[float]],
                tokens: list[int | None], finish: list[str], groups: list[int] | None = None,
                tree: list[dict] | None = None, notes: list[str] | None = None) -> Record:
    agg = [aggregate(s, recipe.agg_strategy) for s in step_scores]
    selected = max(range(len(agg)), key=agg.__getitem__) if agg else None
    return Record(
        problem_id=problem.problem_id, problem=problem.problem, answer=problem.answer,
        level=problem.level, subject=problem.subject, completions=completions,
        step_scores=step_scores, agg_scores=agg, completion_tokens=tokens, finish_reasons=finish,
        selected=selected, pred=extract_answer(completions[selected]) if selected is not None else None,
        approach=recipe.approach, agg_strategy=recipe.agg_strategy,
        groups=groups if groups is not None else list(range(len(completions))),
        tree=tree or [], notes=notes or [],
    )
