"""Generated tokens/s of the vLLM and transformers backends, for the three strategies, in one process.

    .venv-vllm/bin/python benchmarks/bench_backends.py --problems 2 --n 4 --max-tokens 32

Run it where vllm is importable (the .venv-vllm of .ci/run holds both backends). Each backend runs
best-of-N, beam search and DVTS on the same problems with the same recipe and the same PRM (the
embedded model in RLHFlow's format, on transformers, its score cache cleared before every run).
Printed per strategy and backend: generated tokens per second of generation time (the backend's
own speed), per second of wall time (what the search gets, PRM included), and the vLLM /
transformers ratio of both.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ttc_mlops.cli import setup_logging  # noqa: E402
from ttc_mlops.config import EMBEDDED_MODEL, build_recipe  # noqa: E402

log = logging.getLogger("bench_backends")

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "math500.jsonl"
BACKENDS = ("transformers", "vllm")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=2, help="MATH-500 problems (the first ones)")
    ap.add_argument("--n", type=int, default=4, help="N, completions per problem")
    ap.add_argument("--beam-width", type=int, default=2, help="M (beam search, DVTS)")
    ap.add_argument("--num-iterations", type=int, default=2, help="search depth in steps")
    ap.add_argument("--max-tokens", type=int, default=32, help="per step (per completion for best_of_n)")
    ap.add_argument("--strategies", default="best_of_n,beam_search,dvts", help="comma-separated")
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--prm", default=EMBEDDED_MODEL, help="PRM (RLHFlow format)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="problems (.jsonl)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=42)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()

    from ttc_mlops.data import load_dataset_problems
    from ttc_mlops.policy import vllm as vllm_backend
    from ttc_mlops.policy.hf import HFPolicy
    from ttc_mlops.prm import load_prm
    from ttc_mlops.runner import metered
    from ttc_mlops.strategies import STRATEGIES

    strategies = [s for s in args.strategies.split(",") if s in STRATEGIES]
    base = {"model_path": args.model, "prm_path": args.prm, "dtype": args.dtype, "dataset_name": args.data,
            "num_samples": args.problems, "n": args.n, "beam_width": args.beam_width,
            "num_iterations": args.num_iterations, "max_tokens": args.max_tokens, "seed": args.seed,
            "search_batch_size": args.problems, "prm_batch_size": 16}
    recipes = {s: build_recipe({**base, "approach": s}) for s in strategies}
    first = recipes[strategies[0]]
    usable, why = vllm_backend.available(first.model_copy(update={"backend": "vllm"}).policy_settings)
    if not usable:
        sys.exit(f"vLLM cannot run here ({why}); run this with .venv-vllm/bin/python")
    problems = load_dataset_problems(first)[: args.problems]
    prm = load_prm(first.prm_settings)

    results: dict[tuple[str, str], tuple[int, float, float]] = {}
    for backend in BACKENDS:
        t = time.perf_counter()
        settings = first.policy_settings
        policy = HFPolicy(settings) if backend == "transformers" else vllm_backend.VLLMPolicy(settings)
        log.info("%s loaded in %.1f s", backend, time.perf_counter() - t)
        for name in strategies:
            fed, scorer = metered(policy, prm)
            meter = fed.usage
            fed.clear_cache()  # no run profits from another's caches
            scorer.clear_cache()
            t = time.perf_counter()
            STRATEGIES[name](problems, fed, scorer, recipes[name])
            wall = time.perf_counter() - t
            results[backend, name] = (meter.completion_tokens, meter.gen_s, wall)
            log.info("%s %s: %d tokens, generate %.1f s, wall %.1f s", backend, name, meter.completion_tokens,
                     meter.gen_s, wall)

    print(f"{len(problems)} problems, n={args.n}, M={args.beam_width}, {args.num_iterations} steps, "
          f"max_tokens={args.max_tokens}, model={args.model}")
    print(f"{'strategy':<12} {'backend':<13} {'tokens':>7} {'gen tok/s':>10} {'wall tok/s':>11}")
    for name in strategies:
        for backend in BACKENDS:
            tokens, gen_s, wall = results[backend, name]
            print(f"{name:<12} {backend:<13} {tokens:>7} {tokens / gen_s:>10.1f} {tokens / wall:>11.1f}")
        (ht, hg, hw), (vt, vg, vw) = results["transformers", name], results["vllm", name]
        print(f"{name:<12} {'vllm / hf':<13} {'':>7} {(vt / vg) / (ht / hg):>10.2f} {(vt / vw) / (ht / hw):>11.2f}")


if __name__ == "__main__":
    main()
