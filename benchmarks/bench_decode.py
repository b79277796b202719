"""Decoding speed of the transformers backend against a checkout of older code, measured in one run.

    git worktree add /tmp/ref a909442 && python benchmarks/bench_decode.py --ref /tmp/ref

Two worker processes, one importing this checkout and one `--ref DIR`, load the same model and take
turns on the same cells (rows x prompts), `--repeats` times each, so that whatever else runs on
the machine weighs on both alike; the tables give medians. A cell is one `generate` call of
`--max-tokens` new tokens per row, temperature 0.8, no stop strings, after a one-token call on the
same prompts (the prefix store then holds them, so the figure is mostly decoding). Prompts: short
questions, one per row, or MATH-500 chat prompts (the first rows/4 problems x 4 samples, the
system prompt of the search recipes). Rows that reach the end-of-text token stop early; a cell
counts the tokens generated.

Printed: generated tokens/s per cell for both and their ratio; the rows a step runs on average
(rows that end early leave the batch, and a step on few rows is bound by reading the weights); the
prompts' padding (longest over mean prompt length: attention covers the longest); how many
generations of a cell are identical to the reference's (same seeds; use `--dtype float32` for the
exactness check: in bf16 a rounding difference can flip a sampled token); with `--profile`, where
a 40-row MATH call spends its time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "math500.jsonl"
ROWS = (1, 16, 40)
KINDS = ("short", "math")
SAMPLES = 4  # per MATH problem, as a search's n
# aten ops by what they do, for the profile table
CATEGORIES = {
    "linear": ("aten::mm", "aten::addmm", "aten::linear"),
    "attention": ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_attention_math", "aten::masked_fill", "aten::masked_fill_"),
    "copies": ("aten::copy_", "aten::index", "aten::index_put_", "aten::cat", "aten::clone", "aten::zero_",
               "aten::fill_"),
    "sampling": ("aten::cumsum", "aten::searchsorted", "aten::sort", "aten::rand"),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", help="a checkout of the code to compare with (e.g. a git worktree)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated batch sizes")
    ap.add_argument("--kinds", default=",".join(KINDS), help="prompt sets: short, math")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3, help="turns per cell and checkout; medians are printed")
    ap.add_argument("--model", default=None, help="policy model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="MATH-500 problems (.jsonl)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="also profile one 40-row MATH call of each checkout")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # the checkout a worker process imports
    return ap.parse_args(argv)


def worker(args) -> None:
    """Serve cells read as JSON lines on stdin, one JSON line of results each on stdout."""
    sys.path.insert(0, args.worker)
    import torch

    from ttc_mlops.config import EMBEDDED_MODEL, Recipe
    from ttc_mlops.policy import Sampling
    from ttc_mlops.policy.hf import HFPolicy

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(model_path=args.model or EMBEDDED_MODEL, dtype=args.dtype)
    policy = HFPolicy(recipe.policy_settings)
    with open(args.data) as f:
        problems = [json.loads(line)["problem"] for line in f]
    print(json.dumps({"threads": torch.get_num_threads(), "dtype": str(policy.model.dtype),
                      "attention": policy.model.config._attn_implementation}), flush=True)
    for line in sys.stdin:
        cell = json.loads(line)
        rows = cell["rows"]
        if cell["kind"] == "math":
            k = -(-rows // SAMPLES)
            prompts = [policy.chat_prompt(recipe.system_prompt, p) for p in problems[:k] for _ in range(SAMPLES)][:rows]
        else:
            prompts = [policy.chat_prompt("", f"What is {i} + {2 * i + 3}?") for i in range(rows)]
        seeds = list(range(rows))
        policy.clear_cache()
        policy.generate(prompts, Sampling(temperature=0.8, max_tokens=1), seeds)
        sampling = Sampling(temperature=0.8, max_tokens=cell["max_tokens"])
        prof = None
        start = time.perf_counter()
        if cell.get("profile"):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                gens = policy.generate(prompts, sampling, seeds)
        else:
            gens = policy.generate(prompts, sampling, seeds)
        seconds = time.perf_counter() - start
        lengths = [len(policy.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        out = {"tokens": sum(g.num_tokens for g in gens), "seconds": seconds, "texts": [g.text for g in gens],
               "padding": max(lengths) / statistics.mean(lengths),
               "live": sum(g.num_tokens for g in gens) / max(g.num_tokens for g in gens)}
        if prof is not None:
            out["profile"] = _categorise(prof, seconds)
        print(json.dumps(out), flush=True)


def _categorise(prof, seconds: float) -> dict[str, float]:
    """Seconds of self CPU time per category; the rest of the wall time is Python and waiting."""
    spent = {name: 0.0 for name in CATEGORIES}
    spent["other ops"] = 0.0
    for event in prof.key_averages():
        name = next((c for c, ops in CATEGORIES.items() if event.key in ops), "other ops")
        spent[name] += event.self_cpu_time_total / 1e6
    spent["python, waiting"] = max(0.0, seconds - sum(spent.values()))
    return spent


class Worker:
    def __init__(self, root: Path, args):
        cmd = [sys.executable, __file__, "--worker", str(root), "--data", args.data, "--dtype", args.dtype,
               "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a worker process failed (exit code {self.proc.wait()}); its error is above")
        return json.loads(line)

    def run(self, **cell) -> dict:
        self.proc.stdin.write(json.dumps(cell) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    rows = [int(r) for r in args.rows.split(",")]
    kinds = [k for k in args.kinds.split(",") if k in KINDS]
    workers = {"new": Worker(ROOT, args)}
    if args.ref:
        workers["ref"] = Worker(Path(args.ref).resolve(), args)
    for name, w in workers.items():
        print(f"{name}: {w.info}", flush=True)
    results: dict[tuple, list[dict]] = {}
    for repeat in range(args.repeats):
        for kind in kinds:
            for n in rows:
                for name, w in (workers.items() if repeat % 2 == 0 else reversed(workers.items())):
                    r = w.run(rows=n, kind=kind, max_tokens=args.max_tokens)
                    results.setdefault((name, kind, n), []).append(r)
                    print(f"  {name:>3} {kind:>5} x{n:<3} {r['tokens'] / r['seconds']:7.1f} tok/s", flush=True)
    profiles = {name: w.run(rows=40, kind="math", max_tokens=args.max_tokens, profile=True)["profile"]
                for name, w in workers.items()} if args.profile else {}
    for w in workers.values():
        w.close()

    def rate(name, kind, n):
        return statistics.median(r["tokens"] / r["seconds"] for r in results[(name, kind, n)])

    print(f"\ngenerated tok/s, median of {args.repeats} ({args.max_tokens} new tokens a row, dtype {args.dtype})")
    print("(live: rows a decoding step runs on average, as rows end at the end-of-text token)")
    print(f"{'prompts':>7} {'rows':>4} {'live':>5} {'padding':>7} {'new':>8}"
          + (f" {'ref':>8} {'new/ref':>7} {'same':>5}" if args.ref else ""))
    for kind in kinds:
        for n in rows:
            first = results[("new", kind, n)][0]
            line = f"{kind:>7} {n:>4} {first['live']:>5.1f} {first['padding']:>7.2f} {rate('new', kind, n):>8.1f}"
            if args.ref:
                same = sum(a == b for a, b in zip(first["texts"], results[("ref", kind, n)][0]["texts"]))
                line += (f" {rate('ref', kind, n):>8.1f} {rate('new', kind, n) / rate('ref', kind, n):>6.2f}x"
                         f" {same:>2}/{n:<2}")
            print(line)
    if args.ref and "math" in kinds and 40 in rows:
        ratios = [a["tokens"] / a["seconds"] / (b["tokens"] / b["seconds"])
                  for a, b in zip(results[("new", "math", 40)], results[("ref", "math", 40)])]
        print(f"\n40-row MATH peak: {rate('new', 'math', 40):.1f} tok/s against {rate('ref', 'math', 40):.1f}, "
              f"{statistics.median(ratios):.2f}x (median of per-turn ratios {', '.join(f'{x:.2f}' for x in ratios)})")
    if profiles:
        names = list(profiles)
        print("\nwhere a 40-row MATH call spends its time (s, under the profiler)")
        print(f"{'':>16}" + "".join(f"{n:>9}" for n in names))
        for category in profiles[names[0]]:
            print(f"{category:>16}" + "".join(f"{profiles[n][category]:>9.2f}" for n in names))


if __name__ == "__main__":
    main()
