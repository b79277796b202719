"""Evaluate at MATH-500 scale: 500 problems x N=256 synthetic records, timed.

    python benchmarks/bench_evaluate.py --problems 500 --n 256

Records are built from the real MATH-500 gold answers (../shared/data/math500.jsonl). A problem's
completions draw their answers from realistic forms: the gold answer as written, the gold answer in
other notations (0.5 for \\frac{1}{2}, \\dfrac, spacing, "x = ..."), near misses (off by one, sign,
inverted fraction, a changed digit), scattered wrong numbers, and junk (no boxed answer, broken
LaTeX, words). Scores favour right answers a little. Prints the wall time of evaluate_records
(extraction, grading on all cores, voting at n = 1, 2, 4, ..., N, per level) and the number of
distinct answers graded; the target is under 60 s on a 2-core machine.

    python benchmarks/bench_evaluate.py --tracing --problems 50 --n 16 --beam-width 4 --trace 50

`--tracing` times the whole evaluate step (`evaluate_parent`: read the merged records from a SQLite
tracking store, grade, vote, log metrics, tables, pages, the dataset) on beam-search records with
step trees of realistic size (N completions, N candidate steps per iteration of ~60 tokens, the
N / beam_width best kept), with `trace_problems` 0 and `--trace`, alternately, each on a fresh
parent run holding the same records; it prints both wall times and the overhead of tracing.
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


STEP = ("## Step {k}: Work on the expression\n\nWe substitute $x = {v}$ into the equation and simplify both "
        "sides, collecting the terms in $x$ on the left: ${v}x^2 + {k}x - {v} = 0$, so the discriminant is "
        "${k}^2 + 4 \\cdot {v}^2$.\n\n")


def beam_record(index: int, row: dict, n: int, beam_width: int, rng: random.Random) -> Record:
    """A beam search's record of realistic size: every iteration N candidate steps (beam_width per
    kept beam), the N / beam_width best kept, the rest pruned; the last iteration's N finish."""
    from ttc_mlops.records import TreeNode

    depth = rng.randint(6, 16)
    tree, kept = [], [None]
    for it in range(depth):
        parents = kept if it else [None]
        width = n if it == 0 else beam_width
        nodes = []
        for parent in parents:
            for _ in range(width):
                score = rng.random()
                last = it == depth - 1
                text = STEP.format(k=it + 1, v=rng.randint(2, 99)) if not last else \
                    f"Therefore, the final answer is: $\\boxed{{{row['answer'] if rng.random() < 0.4 else rng.randint(0, 99)}}}$."
                nodes.append(TreeNode(len(tree) + len(nodes), parent, it, text, "", rng.randint(40, 80),
                                      "eos" if last else "stop", score, score, "finished" if last else "pruned"))
        if it < depth - 1:
            for node in sorted(nodes, key=lambda x: -x.agg)[: n // beam_width]:
                node.status = "kept"
            kept = [node.id for node in nodes if node.status == "kept"]
        tree += nodes
    by_id = {node.id: node for node in tree}

    def path(node) -> str:
        return (path(by_id[node.parent]) if node.parent is not None else "") + node.step

    leaves = [node for node in tree if node.status == "finished"][:n]
    for i, leaf in enumerate(leaves):
        leaf.completion = i
    scores = [[leaf.step_score] for leaf in leaves]
    agg = [leaf.agg for leaf in leaves]
    best = max(range(len(leaves)), key=lambda i: agg[i])
    return Record(problem_id=row.get("unique_id", str(index)), problem=row["problem"], answer=row["answer"],
                  level=row.get("level"), subject=row.get("subject"), completions=[path(leaf) for leaf in leaves],
                  step_scores=scores, agg_scores=agg, completion_tokens=[rng.randint(300, 900) for _ in leaves],
                  finish_reasons=["eos"] * len(leaves), selected=best, pred=None, approach="beam_search",
                  agg_strategy="last", groups=[i // beam_width for i in range(len(leaves))], tree=tree,
                  finished=[True] * len(leaves))


def tracing_overhead(args, rows: list[dict]) -> None:
    """evaluate_parent's wall time with and without traces, on fresh parents of the same records."""
    import tempfile

    import mlflow

    from ttc_mlops import names
    from ttc_mlops.config import EMBEDDED_MODEL, Recipe
    from ttc_mlops.pipeline import store
    from ttc_mlops.pipeline.evaluate import evaluate_parent

    rng = random.Random(0)
    records = [beam_record(i, row, args.n, args.beam_width, rng) for i, row in enumerate(rows)]
    size = sum(len(json.dumps(r.to_dict())) for r in records) / len(records)
    recipe = Recipe(approach="beam_search", n=args.n, beam_width=args.beam_width, model_path=EMBEDDED_MODEL,
                    prm_path=EMBEDDED_MODEL, dataset_name="HuggingFaceH4/MATH-500", experiment_name="bench-tracing")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        exp = store.ensure_experiment("bench-tracing")
        times: dict[int, list[float]] = {0: [], args.trace: []}
        cpus: dict[int, list[float]] = {0: [], args.trace: []}
        writing: list[float] = []  # wall time inside traces.log_traces, of the traced evaluations
        from ttc_mlops.pipeline import traces

        def timed(*a, _log=traces.log_traces, **kw):
            t = time.perf_counter()
            try:
                return _log(*a, **kw)
            finally:
                if a[1].trace_problems:
                    writing.append(time.perf_counter() - t)

        traces.log_traces = timed
        for rep in range(-1, args.repeats):  # -1: a warm-up (imports, the grader's first calls), not counted
            for k in ((0,) if rep < 0 else (0, args.trace) if rep % 2 == 0 else (args.trace, 0)):
                pid = store.client().create_run(exp, tags={names.TAG_ROLE: names.ROLE_PARENT}).info.run_id
                store.log_records(pid, records, names.MERGED_RECORDS)
                store.set_tags(pid, {names.TAG_MERGED: names.MERGED_COMPLETE})
                t0, c0 = time.perf_counter(), _cpu()
                result = evaluate_parent(pid, recipe.model_copy(update={"trace_problems": k}), register=args.register,
                                         workers=args.workers)
                if rep >= 0:
                    times[k].append(time.perf_counter() - t0)
                    cpus[k].append(_cpu() - c0)
                elif writing:
                    writing.clear()
                assert len(result.traces) == min(k, len(records)), (k, len(result.traces))
    off, on = sorted(times[0])[len(times[0]) // 2], sorted(times[args.trace])[len(times[args.trace]) // 2]
    nodes = sum(len(r.tree) for r in records) / len(records)
    print(f"{len(records)} beam-search records (N={args.n}, beam_width={args.beam_width}, {nodes:.0f} tree nodes and "
          f"{size / 1000:.0f} kB of JSON per record), register={args.register}: evaluate median of {args.repeats} "
          f"{off:.2f} s without traces, {on:.2f} s tracing {min(args.trace, len(records))} problems: "
          f"+{on - off:.2f} s ({100 * (on - off) / off:+.1f}%)")
    print("  wall without: " + ", ".join(f"{t:.2f}" for t in times[0]) + " s; with: " + ", ".join(f"{t:.2f}" for t in times[args.trace]) + " s")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    c_off, c_on, w = med(cpus[0]), med(cpus[args.trace]), med(writing)
    print(f"  CPU (this process and the grading workers), median: {c_off:.2f} s without, {c_on:.2f} s with "
          f"({100 * (c_on - c_off) / c_off:+.1f}%); writing the traces (traces.log_traces) took {w:.2f} s wall, "
          f"{100 * w / off:.1f}% of evaluate without traces (each: " + ", ".join(f"{t:.2f}" for t in writing) + " s)")


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
    ap.add_argument("--tracing", action="store_true", help="time evaluate_parent with and without traces instead")
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--trace", type=int, default=50, help="trace_problems of the traced runs (--tracing)")
    ap.add_argument("--repeats", type=int, default=3, help="evaluations of each kind, alternating (--tracing)")
    ap.add_argument("--register", action="store_true", help="register a model version too, as `ttc evaluate` does")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]  # other work on the machine stretches the wall time, not the CPU time
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()][: args.problems]
    if args.tracing:
        print(f"load average before: {load:.1f}")
        return tracing_overhead(args, rows)
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
