"""Evaluate at MATH-500 scale: 500 problems x N=256 synthetic records, timed.

    python benchmarks/bench_evaluate.py --problems 500 --n 256

Records are built from the real MATH-500 gold answers (../shared/data/math500.jsonl). A problem's
completions draw their answers from realistic forms: the gold answer as written, the gold answer in
other notations (0.5 for \\frac{1}{2}, \\dfrac, spacing, "x = ..."), near misses (off by one, sign,
inverted fraction, a changed digit), scattered wrong numbers, and junk (no boxed answer, broken
LaTeX, words). Scores favour right answers a little. Prints the wall time of evaluate_records
(extraction, grading on all cores, voting at n = 1, 2, 4, ..., N, per level) and the number of
distinct answers graded; the target is under 60 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ttc_mlops.grading import plain_number  # noqa: E402
from ttc_mlops.records import Record  # noqa: E402
from ttc_mlops.voting import evaluate_records  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "math500.jsonl"
JUNK = [None, None, "\\frac{", "x", "I don't know", "undefined", "\\text{no solution}", "\\infty", "", "?"]


def other_notations(gold: str) -> list[str]:
    value = plain_number(gold)
    forms = [f" {gold} ", f"x = {gold}", gold.replace("\\frac", "\\dfrac"), f"\\left({gold}\\right)"]
    if value is not None and value.denominator == 1:
        forms += [f"{value.numerator}.0", f"\\frac{{{2 * value.numerator}}}{{2}}"]
    elif value is not None:
        forms += [f"{value.numerator}/{value.denominator}", f"\\frac{{{value.numerator}}}{{{value.denominator}}}"]
        if 10**6 % value.denominator == 0:
            forms.append(f"{float(value):g}")
    return list(dict.fromkeys(f for f in forms if f != gold))


def near_misses(gold: str, rng: random.Random) -> list[str]:
    value = plain_number(gold)
    if value is not None:
        v = value
        forms = [v + 1, v - 1, -v, 2 * v, v + 10] + ([1 / v] if v else [])
        return list(dict.fromkeys(str(f.numerator) if f.denominator == 1 else f"\\frac{{{f.numerator}}}{{{f.denominator}}}"
                                  for f in forms if f != v))
    digits = [i for i, ch in enumerate(gold) if ch.isdigit()]
    forms = []
    for i in rng.sample(digits, min(3, len(digits))):
        forms.append(gold[:i] + str((int(gold[i]) + 1) % 10) + gold[i + 1 :])
    forms += [f"-{gold}" if not gold.startswith("-") else gold[1:], f"2{gold}"]
    return list(dict.fromkeys(f for f in forms if f != gold))


def problem_records(index: int, row: dict, n: int) -> Record:
    rng = random.Random(index)
    gold = row["answer"]
    right = [gold] + other_notations(gold)
    wrong = near_misses(gold, rng)
    answers, scores = [], []
    for _ in range(n):
        u = rng.random()
        if u < 0.35:
            a, s = gold, rng.betavariate(4, 2)
        elif u < 0.5:
            a, s = rng.choice(right), rng.betavariate(3, 2)
        elif u < 0.8:
            a, s = rng.choice(wrong), rng.betavariate(2, 3)
        elif u < 0.9:
            a, s = str(rng.randint(-100, 1000)), rng.betavariate(2, 4)
        else:
            a, s = rng.choice(JUNK), rng.betavariate(1, 4)
        answers.append(a)
        scores.append(s)
    completions = [f"Let me work.\n\nTherefore, the final answer is: $\\boxed{{{a}}}$. I hope it is correct."
                   if a is not None else "Let me work.\n\nI am not sure." for a in answers]
    return Record(problem_id=row.get("unique_id", str(index)), problem=row["problem"], answer=gold,
                  level=row.get("level"), subject=row.get("subject"), completions=completions,
                  step_scores=[[s] for s in scores], agg_scores=scores, completion_tokens=[None] * n,
                  finish_reasons=["eos"] * n, selected=None, pred=None, approach="best_of_n", agg_strategy="last")


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the grading workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="grading processes (default: all cores)")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]  # other work on the machine stretches the wall time, not the CPU time
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()][: args.problems]
    records = [problem_records(i, row, args.n) for i, row in enumerate(rows)]
    t0, cpu0 = time.perf_counter(), _cpu()
    ev = evaluate_records(records, "last", max_n=args.n, workers=args.workers)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    print(f"{len(records)} problems x N={args.n} ({len(records) * args.n} completions), "
          f"{ev.distinct_answers} distinct answers, {args.workers or os.cpu_count()} worker(s): "
          f"evaluate {wall:.1f} s wall, {cpu:.1f} s CPU in all processes (load average before: {load:.1f})")
    for n in sorted(ev.metrics):
        print(f"  n={n:<4d} " + "  ".join(f"{k}={v:.3f}" for k, v in ev.at(n).items()))


if __name__ == "__main__":
    main()
