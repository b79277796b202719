"""Graded records -> accuracy at every budget n = 1, 2, 4, ..., N: pure computation, no model, no MLflow.

    python -c "import ttc_mlops.voting as v; print(v.budgets(12))"

For each n the first n completions of a problem are kept (whole DVTS subtrees / beams: a group is
never cut), and four choices are graded: naive (the highest aggregated score), weighted
(equivalent answers pooled, their scores summed), majority (the most frequent answer) and pass@n
(any completion correct). Scores are aggregated with the recipe's `agg_strategy`.

A vote never sees the gold answer: a problem's answers are grouped into classes by equivalence
among themselves (`classify`), then each class is graded. An unfinished completion (a DVTS candidate
that stopped at a step) gives no answer; where the grader cannot decide a class, it is counted wrong
and reported (`Evaluation.undecided`).

Grading is the hot path (MATH-500 at N=256 is 128,000 completions). It works per problem on its
distinct answers only: each is parsed once into a canonical key (plain numbers such as 5, -2.5,
\\frac{3}{4}, 3/4 without math-verify), keys that could be equal are compared (math-verify, cached
by pair; see `ttc_mlops.grading`), and each class is graded once. Large record sets are graded on
all cores. `ttc evaluate` (ttc_mlops.pipeline.
evaluate) runs this on a parent's merged records and logs the result.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

from .grading import answer_key, equivalent, extract_answer
from .names import (
    M_ACC_MAJ,
    M_ACC_NAIVE,
    M_ACC_WEIGHTED,
    M_EVAL_PROBLEMS,
    M_PASS,
    M_UNDECIDED,
    VOTING_METRICS,
    level_metric,
)
from .prm import aggregate
from .records import Record

log = logging.getLogger(__name__)

LEVELS = (1, 2, 3, 4, 5)
POOL_MIN_ANSWERS = 3000  # distinct answers below which a process pool costs more than it saves


class EvaluateError(ValueError):
    """Evaluate cannot go on; the message names the run and what is missing."""


def classify(gold: str | None, answers: list[str]) -> tuple[list[int], list[bool | None]]:
    """Answer classes of a problem's distinct answers: (class per answer, verdict per class).

    Classes are formed from the answers alone, never through the gold answer: answers with one
    canonical key share a class, and an answer with a new key joins the first earlier class it is
    equivalent to (`x = 5` and `5`; `\\frac{1}{2}` and `0.5` already share a key). Only then is each
    class graded, by its first answer, against the gold: True, False, or None where the grader
    cannot decide. So two answers that each equal the gold but not each other (`10` and `0.1`
    against `10\\%`) stay two classes and never pool their votes. N=256 costs one parse per
    distinct answer; comparisons run only between keys that could be equal."""
    keys = {a: answer_key(a) for a in answers}
    heads: list[str] = []  # the first answer of each class
    by_key: dict[tuple, int] = {}
    classes: list[int] = []
    for a in answers:
        if keys[a] not in by_key:
            same = next((c for c, head in enumerate(heads) if equivalent(a, head, keys)), None)
            if same is None:
                same = len(heads)
                heads.append(a)
            by_key[keys[a]] = same
        classes.append(by_key[keys[a]])
    if gold is None:
        return classes, [None] * len(heads)
    keys.setdefault(gold, answer_key(gold))
    return classes, [equivalent(head, gold, keys) for head in heads]


def _classify_task(task: tuple[str | None, list[str]]) -> tuple[list[int], list[bool | None]]:
    return classify(*task)


@dataclass
class Graded:
    """One problem, graded once for every n."""
    record: Record
    answers: list[str | None]  # per completion: the extracted answer (None: no answer)
    level: int | None
    classes: list[int]  # per completion: its answer class, -1 where it gives no answer
    correct: list[bool | None]  # per class; None where the grader could not decide
    scores: list[float]  # per completion, aggregated with the recipe's agg_strategy
    order: list[list[int]]  # completion indices per group, groups in the order they were produced
    finished: list[bool]  # per completion: False for a solution stopped mid-way (it gives no answer)


def _groups(record: Record) -> list[list[int]]:
    groups = record.groups if len(record.groups) == len(record.completions) else list(range(len(record.completions)))
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    return list(by_group.values())


def grade(records: list[Record], agg_strategy: str, workers: int | None = None) -> tuple[list[Graded], int]:
    """Grade every record that has a gold answer; returns (graded, distinct answers compared).
    An unfinished completion (a DVTS candidate stopped at a step) gives no answer, whatever its
    text holds."""
    records = [r for r in records if r.answer is not None]
    finished = [r.finished if len(r.finished) == len(r.completions) else [True] * len(r.completions) for r in records]
    answers = [[extract_answer(c) if done else None for c, done in zip(r.completions, fin)]
               for r, fin in zip(records, finished)]
    distinct = [list(dict.fromkeys(a for a in ans if a is not None)) for ans in answers]
    tasks = [(r.answer, d) for r, d in zip(records, distinct)]
    total = sum(len(d) for d in distinct)
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1 and total >= POOL_MIN_ANSWERS:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent may hold MLflow's threads and connections
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_classify_task, tasks, chunksize=4))
    else:
        results = [classify(*t) for t in tasks]
    graded = []
    for r, ans, d, fin, (classes, correct) in zip(records, answers, distinct, finished, results):
        index = dict(zip(d, classes))
        scores = r.agg_scores if r.agg_strategy == agg_strategy and len(r.agg_scores) == len(r.completions) \
            else [aggregate(s, agg_strategy) for s in r.step_scores]
        graded.append(Graded(r, ans, r.level, [index[a] if a is not None else -1 for a in ans], correct, scores,
                             _groups(r), fin))
    return graded, total


def subset(g: Graded, n: int) -> list[int]:
    """The first n completions, whole groups only (empty when the first group is larger than n)."""
    kept: list[int] = []
    for group in g.order:
        if len(kept) + len(group) > n:
            break
        kept.extend(group)
    return kept


def picks(g: Graded, kept: list[int]) -> dict[str, int | None]:
    """The completion each voting rule picks among the kept ones (None: no answer to pick). Naive
    picks the best-scored finished completion (the first of equal scores); the votes count
    answered completions only, and name the first completion of the winning class."""
    best = max([i for i in kept if g.finished[i]] or kept, key=lambda i: g.scores[i])
    answered = [i for i in kept if g.classes[i] >= 0]
    weight: dict[int, float] = {}
    for i in answered:
        weight[g.classes[i]] = weight.get(g.classes[i], 0.0) + g.scores[i]
    votes = Counter(g.classes[i] for i in answered)
    first = {}
    for i in answered:
        first.setdefault(g.classes[i], i)
    return {
        M_ACC_NAIVE: best,
        M_ACC_WEIGHTED: first[max(weight, key=weight.get)] if weight else None,
        M_ACC_MAJ: first[votes.most_common(1)[0][0]] if votes else None,
    }


def right(g: Graded, i: int | None) -> bool:
    """Completion i gives an answer graded correct."""
    return i is not None and g.classes[i] >= 0 and g.correct[g.classes[i]] is True


def choose(g: Graded, kept: list[int]) -> dict[str, bool]:
    """Whether each voting rule picks a correct answer among the kept completions."""
    chosen = {rule: right(g, i) for rule, i in picks(g, kept).items()}
    return {**chosen, M_PASS: any(right(g, i) for i in kept)}


def problem_rows(graded: list[Graded], n: int) -> list[dict]:
    """One row per problem at budget n, for people: the gold answer, what each rule picked, and
    whether it is right (None where the grader could not decide)."""
    rows = []
    for g in graded:
        kept = subset(g, n)
        if not kept:
            continue
        pick = picks(g, kept)
        naive, weighted = pick[M_ACC_NAIVE], pick[M_ACC_WEIGHTED]
        r = g.record
        rows.append({
            "problem_id": r.problem_id, "level": r.level,
            "correct": None if g.classes[naive] >= 0 and g.correct[g.classes[naive]] is None else right(g, naive),
            "selected": g.answers[naive], "gold": r.answer, "pass": any(right(g, i) for i in kept),
            "weighted_vote": g.answers[weighted] if weighted is not None else None,
            "weighted_correct": right(g, weighted), "score": round(g.scores[naive], 4),
            "tokens": sum(t for t in r.completion_tokens if t is not None),
            "finish": r.finish_reasons[naive] if naive < len(r.finish_reasons) else None,
            "notes": "; ".join(r.notes),
        })
    return rows


def budgets(max_n: int) -> list[int]:
    """1, 2, 4, ... up to max_n, and max_n itself."""
    ns = [1 << k for k in range(max_n.bit_length()) if 1 << k <= max_n]
    return ns + ([max_n] if ns[-1] != max_n else [])


@dataclass
class Evaluation:
    rows: list[dict]  # one per (n, level): the table artifact
    metrics: dict[int, dict[str, float]]  # n -> metric name -> value, logged with step = n
    problems: int
    distinct_answers: int
    undecided: int  # answer classes the grader could not decide (counted wrong), over all problems
    problems_table: list[dict]  # one row per problem at the largest n (`problem_rows`)

    def at(self, n: int | None = None) -> dict[str, float]:
        """Overall accuracies at n (default: the largest n)."""
        n = max(self.metrics) if n is None else n
        return {k: v for k, v in self.metrics[n].items() if k in VOTING_METRICS}


def evaluate_records(records: list[Record], agg_strategy: str, voting: bool = True, max_n: int | None = None,
                     workers: int | None = None) -> Evaluation:
    graded, distinct = grade(records, agg_strategy, workers)
    if not graded:
        raise EvaluateError(f"none of the {len(records)} records has a gold answer: nothing to grade")
    largest = max(len(g.scores) for g in graded)
    rules = [m for m in VOTING_METRICS if voting or m not in (M_ACC_WEIGHTED, M_ACC_MAJ)]
    rows, metrics = [], {}
    for n in budgets(min(max_n or largest, largest)):
        kept = [subset(g, n) for g in graded]
        if not all(kept):  # n is smaller than a whole group (a DVTS subtree, a beam)
            continue
        outcomes = [(g.level, choose(g, k)) for g, k in zip(graded, kept)]
        metrics[n] = {}
        for level in ("all", *LEVELS):
            chosen = [o for lv, o in outcomes if level == "all" or lv == level]
            if not chosen:
                continue
            acc = {m: sum(o[m] for o in chosen) / len(chosen) for m in rules}
            rows.append({"n": n, "level": str(level), "problems": len(chosen), **acc})
            if level == "all":
                metrics[n].update(acc)
                metrics[n][M_EVAL_PROBLEMS] = len(chosen)
            else:
                metrics[n].update({level_metric(m, level): v for m, v in acc.items()})
    if not metrics:
        raise EvaluateError(f"no budget n <= {max_n or largest} keeps a whole group of completions in every record")
    undecided = sum(v is None for g in graded for v in g.correct)
    if undecided:
        log.warning("%d answer classes could not be graded (counted wrong); see the metric %s", undecided, M_UNDECIDED)
    return Evaluation(rows, metrics, len(graded), distinct, undecided, problem_rows(graded, max(metrics)))


def evaluate(records: list[Record], recipe, workers: int | None = None) -> Evaluation:
    """Grade and vote a recipe's records at n = 1, 2, 4, ..., N with its aggregation (what `ttc evaluate`
    logs, without MLflow): `evaluate(records, recipe).at()` is the accuracy per voting rule at N."""
    return evaluate_records(records, recipe.agg_strategy, recipe.apply_voting, recipe.n, workers)
