"""Would starting a search's next iteration before its slowest candidate is back pay? A simulation
on a step-level search's records (beam search, DVTS), with step and PRM costs you measured.

    .venv-vllm/bin/python benchmarks/bench_search.py --backend vllm --problems 10 --n 8 --beam-width 4 \
        --num-iterations 8 --max-tokens 512 --strategies dvts --sequential '' --lockstep 0 --save-records /tmp/r
    python benchmarks/sim_speculation.py /tmp/r/dvts.jsonl --step-ms 15 --row-ms 1.05

Every candidate of a record's tree is a request as long as its step (`tokens`); a group is what
`run_steps` waits for before it scores and moves on (a problem's iteration for beam search, a
subtree's for DVTS), and its next iteration is the group one iteration deeper. The engine advances
every live request one token a step, at `--step-ms` + `--row-ms` per live request; a PRM call stops
it for `--prm-call-ms` + `--prm-candidate-ms` per candidate scored (one process: the PRM and
decoding take turns).

- plain: as `run_steps` schedules today; the next iteration starts when the group's last candidate
  is back and scored. Its total is a check on the costs: it should come near the measured
  generation + PRM seconds of the run that wrote the records.
- speculative: when one candidate is left, the others are scored, and the next iteration of the
  best of them (by aggregated score; candidates that ended the solution are not continued) starts.
  When the last one is back and scored, that start is kept if it was the right one (the record's
  kept or chosen candidates), else aborted and the right one started. Aborted requests cost their
  rows while they run and give nothing.

Prints both totals, their engine steps, row-steps and PRM calls, and how many guesses were right.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ttc_mlops.records import Record, read_records  # noqa: E402

CHOSEN = {"kept", "chosen"}  # beam search keeps, DVTS chooses


@dataclass
class Candidate:
    tokens: int
    agg: float
    chosen: bool
    ended: bool  # finished the solution: never continued


def groups_of(records: list[Record]) -> dict[tuple, list[Candidate]]:
    """(record, subtree, iteration) -> its candidates, in tree order."""
    out: dict[tuple, list[Candidate]] = defaultdict(list)
    for i, r in enumerate(records):
        if not r.tree:
            raise SystemExit(f"record {r.problem_id} has no tree: only step-level searches can be simulated")
        for node in r.tree:
            out[(i, node.subtree, node.iteration)].append(
                Candidate(max(node.tokens, 1), node.agg, node.status in CHOSEN, node.status == "finished"))
    return out


@dataclass
class _Group:
    back: set = field(default_factory=set)
    active: bool = True  # its results count (False: started on a guess not yet confirmed)
    guessed: bool = False
    right: bool = False
    closed: bool = False
    wasted: list = field(default_factory=list)  # request ids of a wrong guess


def simulate(groups: dict[tuple, list[Candidate]], speculate: bool, step_ms: float, row_ms: float,
             prm_call_ms: float, prm_candidate_ms: float) -> dict[str, float]:
    ms = 0.0
    steps = row_steps = calls = right = wrong = 0
    live: dict[int, list] = {}  # request id -> [tokens left, group, candidate, counts]
    state: dict[tuple, _Group] = defaultdict(_Group)
    next_id = 0

    def start(key: tuple, counts: bool) -> list[int]:
        nonlocal next_id
        ids = []
        for k, c in enumerate(groups[key]):
            live[next_id] = [c.tokens, key, k, counts]
            ids.append(next_id)
            next_id += 1
        return ids

    def prm(n: int) -> None:
        nonlocal ms, calls
        ms += prm_call_ms + prm_candidate_ms * n
        calls += 1

    def check(key: tuple) -> None:
        nonlocal right, wrong
        g, cands = state[key], groups[key]
        nxt = (key[0], key[1], key[2] + 1)
        left = len(cands) - len(g.back)
        if speculate and left == 1 and not g.guessed and nxt in groups:
            g.guessed = True
            prm(len(cands) - 1)
            arrived = sorted((cands[k] for k in g.back if not cands[k].ended), key=lambda c: -c.agg)
            kept = sum(c.chosen for c in cands)
            g.right = bool(arrived) and all(c.chosen for c in arrived[:kept]) and len(arrived) >= kept
            if g.right:
                state[nxt].active = False
                start(nxt, counts=True)
            else:
                g.wasted = start(nxt, counts=False)
        if left == 0 and not g.closed:
            g.closed = True
            prm(1 if g.guessed else len(cands))
            if nxt not in groups:
                return
            if g.guessed and g.right:
                right += 1
                state[nxt].active = True
                check(nxt)
                return
            if g.guessed:
                wrong += 1
            for rid in g.wasted:
                live.pop(rid, None)
            start(nxt, counts=True)

    for key in groups:
        if key[2] == 0:
            start(key, counts=True)
    while live:
        ms += step_ms + row_ms * len(live)
        steps += 1
        row_steps += len(live)
        for r in live.values():  # every live request gets its next token
            r[0] -= 1
        for rid in [rid for rid, r in live.items() if r[0] <= 0]:
            if rid not in live:  # aborted by a wrong guess closed in this step
                continue
            _, key, k, counts = live.pop(rid)
            if not counts:
                continue
            state[key].back.add(k)
            if state[key].active:
                check(key)  # what it starts runs from the next step
    return {"s": ms / 1000, "steps": steps, "row_steps": row_steps, "prm_calls": calls, "right": right,
            "wrong": wrong}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path, help="records of a beam search or DVTS (jsonl, as runs write them)")
    ap.add_argument("--step-ms", type=float, default=15.0, help="an engine step's cost at no rows")
    ap.add_argument("--row-ms", type=float, default=1.05, help="what each live request adds to a step")
    ap.add_argument("--prm-call-ms", type=float, default=60.0, help="a PRM call's fixed cost")
    ap.add_argument("--prm-candidate-ms", type=float, default=25.0, help="a PRM call's cost per candidate")
    args = ap.parse_args(argv)
    groups = groups_of(read_records(args.records))
    costs = (args.step_ms, args.row_ms, args.prm_call_ms, args.prm_candidate_ms)
    print(f"{args.records}: {len(groups)} groups; a step {args.step_ms} ms + {args.row_ms} ms a row, a PRM call "
          f"{args.prm_call_ms} ms + {args.prm_candidate_ms} ms a candidate")
    for mode in ("plain", "speculative"):
        r = simulate(groups, mode == "speculative", *costs)
        guesses = f", guesses right {r['right']} / wrong {r['wrong']}" if mode == "speculative" else ""
        print(f"{mode:>12}: {r['s']:.1f} s decoding + PRM, {r['steps']} steps, {r['row_steps']} row-steps, "
              f"{r['prm_calls']} PRM calls{guesses}")


if __name__ == "__main__":
    main()
