"""How well and how fast the grader grades: agreement on peer test suites and MATH-500, speed at N=256.

    python benchmarks/bench_grading.py            # suites only (seconds)
    python benchmarks/bench_grading.py --speed    # and 500 problems x N=256 through evaluate

Four suites, each graded two ways: the path `ttc evaluate` takes (extract the answer, then
`voting.classify`: vote classes formed without the gold answer, each graded) and raw math-verify
(`parse` of the whole text, `verify` against the parsed gold), the floor the grader must not fall
below:
- peer cases: tests/data/grading/peer_cases.jsonl, the expected verdicts of huggingface/Math-Verify's,
  hendrycks/math's and NVIDIA/NeMo-Skills' grading tests (see tests/data/grading/README.md);
- answer-format cases: tests/data/grading/format_cases.jsonl, completions as today's models write
  them (markdown bold, "Answer:" lines, math delimiters, `<think> ... </think>`, units) with the
  expected verdicts of huggingface/lighteval's extraction tests and rllm-org/rllm's math reward
  tests; a pred here is always a completion, its answer extracted as `ttc evaluate` does;
- MATH-500 reference solutions (../shared/data/math500.jsonl) against their own answers: all right;
- perturbed MATH-500 answers (a digit changed, the decimal point moved, a sign flipped, one matrix
  entry changed, an equation's side changed, the base of a numeral changed): all wrong.
`--speed` runs benchmarks/bench_evaluate.py's synthetic records (target: under 60 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ttc_mlops.grading import extract_answer  # noqa: E402
from ttc_mlops.voting import classify  # noqa: E402

PEER_CASES = REPO / "tests" / "data" / "grading" / "peer_cases.jsonl"
FORMAT_CASES = REPO / "tests" / "data" / "grading" / "format_cases.jsonl"
MATH500 = REPO.parent / "shared" / "data" / "math500.jsonl"
_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")  # a text, not a bare answer (\\$ is a currency sign)


def answer_of(text: str) -> str | None:
    """What the evaluate path grades: a bare answer as it is, a text's extracted answer."""
    return extract_answer(text) if _DELIMITED.search(text) or "answer" in text.lower() else text


def ours(pred_text: str, gold_text: str, extracted: bool = True, completion: bool = False) -> bool | None:
    """The evaluate path's verdict on one completion (True / False / None undecided); `completion`:
    the pred is a model's completion whatever it holds (its answer is always extracted)."""
    pred = extract_answer(pred_text) if completion else answer_of(pred_text) if extracted else pred_text
    gold = answer_of(gold_text)
    if pred is None:
        return False
    _, verdicts = classify(gold, [pred])
    return verdicts[0]


def raw_math_verify(pred_text: str, gold_text: str) -> bool:
    from math_verify import parse, verify

    gold = parse(gold_text if _DELIMITED.search(gold_text) else f"${gold_text}$")
    return bool(verify(gold, parse(pred_text)))


def peer_cases(path: Path = PEER_CASES) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def math500_rows(path: Path = MATH500) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- perturbations: each a different answer, so each must grade wrong

def _first_digit(answer: str) -> str | None:
    m = re.search(r"\d", answer)
    return None if m is None else answer[: m.start()] + str((int(m.group()) + 1) % 10) + answer[m.end():]


def _point_moved(answer: str) -> str | None:
    m = re.search(r"(\d)\.(\d)", answer)
    return None if m is None else answer[: m.start()] + m.group(1) + m.group(2) + "." + answer[m.end():]


def _sign_flipped(answer: str) -> str | None:
    if re.fullmatch(r"-?0(\.0*)?", answer.strip()):
        return None  # -0 is 0
    if answer.startswith("-"):
        return answer[1:]
    return "-" + answer if re.match(r"[\d\\(]", answer) else None


def _matrix_entry(answer: str) -> str | None:
    return _first_digit(answer) if "matrix" in answer else None


def _side_changed(answer: str) -> str | None:
    if answer.count("=") != 1:
        return None
    lhs, rhs = answer.split("=")
    return f"{lhs}= {rhs.strip()} + 1"


def _base_changed(answer: str) -> str | None:
    m = re.fullmatch(r"([0-9A-Za-z]+)_\{?(\d+)\}?", answer.replace(" ", ""))
    return None if m is None else f"{m.group(1)}_{{{int(m.group(2)) + 1}}}"


PERTURBATIONS = {"digit": _first_digit, "decimal point": _point_moved, "sign": _sign_flipped,
                 "matrix entry": _matrix_entry, "equation side": _side_changed, "base": _base_changed}


def perturbed(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """(kind, problem id, gold, perturbed answer) for every perturbation that applies."""
    out = []
    for row in rows:
        gold = row["answer"]
        for kind, change in PERTURBATIONS.items():
            other = change(gold)
            if other is not None and other != gold:
                out.append((kind, row["unique_id"], gold, other))
    return out


def _agreement(verdicts: list[bool | None], expected: list[bool]) -> str:
    right = sum(v is e for v, e in zip(verdicts, expected))
    undecided = sum(v is None for v in verdicts)
    return f"{right}/{len(expected)} = {right / max(len(expected), 1):.3f}" + (f" ({undecided} undecided)" if undecided else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", action="store_true", help="also time evaluate on 500 problems x N=256")
    ap.add_argument("--show", type=int, default=10, help="disagreements shown per suite")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    for title, path, completion in (("peer cases", PEER_CASES, False), ("answer-format cases", FORMAT_CASES, True)):
        by_source = defaultdict(list)
        for c in peer_cases(path):
            by_source[c["source"].split(" ")[0]].append(c)
        print(f"{title} ({path.relative_to(REPO)}): evaluate path | raw math-verify")
        missed = []
        for source, group in sorted(by_source.items()):
            mine = [ours(c["pred"], c["gold"], completion=completion) for c in group]
            raw = [raw_math_verify(c["pred"], c["gold"]) for c in group]
            expected = [c["equal"] for c in group]
            print(f"  {source:<28} {_agreement(mine, expected):<28} | {_agreement(raw, expected)}")
            missed += [(c, v) for c, v in zip(group, mine) if v is not c["equal"]]
        for c, v in missed[: args.show]:
            print(f"    ours={v} expected={c['equal']}: gold {c['gold']!r} pred {c['pred'][-160:]!r} ({c['source']})")

    rows = math500_rows()
    mine = [ours(r["solution"], r["answer"]) for r in rows]
    raw = [raw_math_verify(r["solution"], r["answer"]) for r in rows]
    print(f"MATH-500 reference solutions graded right: {_agreement(mine, [True] * len(rows))} | "
          f"{_agreement(raw, [True] * len(rows))}")
    for r, v in [(r, v) for r, v in zip(rows, mine) if v is not True][: args.show]:
        print(f"    {r['unique_id']}: answer {r['answer']!r}, extracted {extract_answer(r['solution'])!r}: {v}")

    changes = perturbed(rows)
    mine = [ours(p, g, extracted=False) for _, _, g, p in changes]
    raw = [raw_math_verify(f"${p}$", g) for _, _, g, p in changes]
    print(f"perturbed MATH-500 answers graded wrong: {_agreement(mine, [False] * len(changes))} | "
          f"{_agreement(raw, [False] * len(changes))}")
    kinds = defaultdict(lambda: [0, 0])
    for (kind, *_), v in zip(changes, mine):
        kinds[kind][0] += v is False
        kinds[kind][1] += 1
    print("    " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in kinds.items()))
    for (kind, pid, g, p), v in [(c, v) for c, v in zip(changes, mine) if v is not False][: args.show]:
        print(f"    {kind} {pid}: gold {g!r} perturbed {p!r}: {v}")
    print(f"suites graded in {time.perf_counter() - t:.1f} s")

    if args.speed:
        sys.path.insert(0, str(REPO / "benchmarks"))
        import bench_evaluate

        bench_evaluate.main([])


if __name__ == "__main__":
    main()
