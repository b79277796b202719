"""Difficulty per problem, two ways, from a best-of-N run's samples: pure computation, no model, no MLflow.

    python -c "from ttc_mlops.difficulty import edges, bin_of; e = edges([0.9, 0.7, 0.5, 0.3, 0.1]); print(e, bin_of(0.6, e))"

As in Snell et al. (2024), a problem's difficulty is a bin of a per-problem score, quintiles over
the problem set by default, bin 1 the easiest:

- **oracle**: the policy's pass@1, estimated as the share of a best-of-N run's N samples graded
  right against the gold answer (needs the gold answer; what the paper calls oracle difficulty);
- **model**: the mean PRM score (each sample's step scores aggregated with the run's
  `agg_strategy`) of the same samples; needs no gold answer, so a new problem can be binned from a
  few samples of its own (the `compute_optimal` strategy's probe).

Bins are thresholds on the score (`edges`), not ranks: problems with equal scores share a bin, and
a new problem is binned by the same thresholds. With many ties (pass@1 of 0 on a hard set) some
bins are empty; `ttc optimal` then routes them like the whole problem set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .voting import Graded, right

KINDS = ("oracle", "model")  # pass@1 against the gold answer | mean PRM score, no gold
DEFAULT_BINS = 5  # quintiles, as the papers do


@dataclass
class ProblemDifficulty:
    problem_id: str
    level: int | None  # the dataset's own level (MATH 1-5), for comparison
    samples: int  # completions the scores are estimated from
    pass1: float  # share of the samples graded right (oracle)
    prm_mean: float  # mean aggregated PRM score of the samples (model-based)

    def score(self, kind: str) -> float:
        """Higher is easier, whichever the kind."""
        return self.pass1 if kind == "oracle" else self.prm_mean


def measure(graded: list[Graded]) -> list[ProblemDifficulty]:
    """Per problem, from every sample a best-of-N run kept: pass@1 (an unanswered or undecided sample
    counts wrong, as in voting) and the mean aggregated PRM score."""
    out = []
    for g in graded:
        k = len(g.scores)
        out.append(ProblemDifficulty(g.record.problem_id, g.level, k,
                                     sum(right(g, i) for i in range(k)) / k if k else 0.0,
                                     sum(g.scores) / k if k else 0.0))
    return out


def edges(scores: list[float], bins: int = DEFAULT_BINS) -> list[float]:
    """bins - 1 thresholds, descending: bin 1 holds scores >= edges[0], bin k scores in
    [edges[k-1], edges[k-2]), the last bin scores below edges[-1]. Each threshold is the score at a
    k / bins quantile of the problems (the easiest first), so bins are as equal as ties allow."""
    if bins < 1:
        raise ValueError(f"bins={bins} must be at least 1")
    if not scores:
        raise ValueError("no problems to bin")
    ranked = sorted(scores, reverse=True)
    return [ranked[math.ceil(k * len(ranked) / bins) - 1] for k in range(1, bins)]


def bin_of(score: float, thresholds: list[float]) -> int:
    """1 (easiest) .. len(thresholds) + 1 (hardest)."""
    return 1 + sum(score < t for t in thresholds)


def assign(problems: list[ProblemDifficulty], kind: str, bins: int = DEFAULT_BINS) -> tuple[dict[str, int], list[float]]:
    """(problem id -> bin, the thresholds) for one kind of difficulty."""
    if kind not in KINDS:
        raise ValueError(f"difficulty={kind!r} is not one of {KINDS}")
    cuts = edges([p.score(kind) for p in problems], bins)
    return {p.problem_id: bin_of(p.score(kind), cuts) for p in problems}, cuts


def table(problems: list[ProblemDifficulty], bins: int = DEFAULT_BINS) -> dict:
    """What `eval/difficulty.json` holds: per problem both scores and both bins, and the thresholds."""
    bins_by = {kind: assign(problems, kind, bins) for kind in KINDS}
    return {
        "bins": bins,
        "edges": {kind: cuts for kind, (_, cuts) in bins_by.items()},
        "problems": [{**asdict(p), **{f"{kind}_bin": bins_by[kind][0][p.problem_id] for kind in KINDS}}
                     for p in problems],
    }


def from_table(data: dict) -> list[ProblemDifficulty]:
    """The per-problem scores of an `eval/difficulty.json` (its bins can be recomputed for any count)."""
    fields = ProblemDifficulty.__dataclass_fields__
    return [ProblemDifficulty(**{k: v for k, v in row.items() if k in fields}) for row in data["problems"]]
