"""Batched search against a one-problem-at-a-time loop, on one backend and model, in one process.

    python benchmarks/bench_search.py --problems 16 --n 4 --max-tokens 64 --strategies beam_search,dvts

Prints, per strategy: problems/s of the batched search (all problems in one search batch, fed to
the backend as it does by default: continuously where it can take requests while it runs), of the
same search scheduled the other way (lockstep waves, one generate call per iteration for all
problems; or fed continuously, where a backend runs in waves unless told otherwise, as
`HFPolicy.continuous = False`) and of the same function called on one problem at a time; their ratios; generated tokens/s
as a fraction of the backend's peak batched sampling rate (measured first, in the same process: one
generate call of problems x n rows, --peak-tokens each, no stop, prompts already cached), of the
peak at the search's own contexts, and of the ceiling over wall time that leaves while the PRM runs
in between decoding (what no schedule in one process can pass); PRM tokens processed per generated
token; generate calls; and for how many problems each other run gave the
same records as the batched one (per-request seeds: a problem's result should not depend on its
batch; float rounding of differently shaped batched matmuls can still flip a sample). The policy's
and the PRM's caches (scores, prefix keys/values) are cleared before every run, so no run profits
from another.

    .venv-vllm/bin/python benchmarks/bench_search.py --backend vllm --problems 10 --n 4 --beam-width 4 \
        --num-iterations 8 --max-tokens 512 --strategies beam_search --sequential ''

`--prm-backend vllm` scores on vLLM's pooling runner in the same process (`--prm-backend
transformers` on this project's prefix store): run the command once with each to compare them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ttc_mlops.cli import setup_logging  # noqa: E402
from ttc_mlops.config import EMBEDDED_MODEL, build_recipe  # noqa: E402

log = logging.getLogger("bench_search")

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "math500.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=16, help="MATH-500 problems (the first ones)")
    ap.add_argument("--n", type=int, default=4, help="N, completions per problem")
    ap.add_argument("--beam-width", type=int, default=2, help="M (beam search, DVTS)")
    ap.add_argument("--num-iterations", type=int, default=4, help="search depth in steps")
    ap.add_argument("--max-tokens", type=int, default=64, help="per step (per completion for best_of_n)")
    ap.add_argument("--peak-tokens", type=int, default=128, help="tokens per row of the peak-rate call")
    ap.add_argument("--strategies", default="best_of_n,beam_search,dvts", help="comma-separated")
    ap.add_argument("--sequential", default="beam_search",
                    help="strategies also run one problem at a time (comma-separated; '' for none)")
    ap.add_argument("--lockstep", type=int, default=1,
                    help="also run beam search / DVTS in lockstep waves on a backend that streams, or fed "
                    "continuously on one set to run in waves (HFPolicy.continuous = False); 0 to skip")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "auto"])
    ap.add_argument("--prm-backend", default="auto", choices=["auto", "transformers", "vllm"],
                    help="where the PRM's forward pass runs (the recipe's prm_backend)")
    ap.add_argument("--model", default=EMBEDDED_MODEL, help="policy model (Hub id, local dir, embedded)")
    ap.add_argument("--prm", default=EMBEDDED_MODEL, help="PRM (Hub id, local dir, embedded)")
    ap.add_argument("--prm-family", default=None, help="how --prm scores (rlhflow, math_shepherd, skywork, "
                    "qwen_math_prm, trl, a plugin's); needed for a local directory")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="problems (.jsonl)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--prm-batch-size", type=int, default=16)
    ap.add_argument("--vllm-enforce-eager", default="auto", choices=["auto", "true", "false"],
                    help="the recipe's vllm_enforce_eager: false compiles the vLLM engines (auto: eager on a CPU)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--save-records", type=Path, default=None,
                    help="write each strategy's batched records to DIR/<strategy>.jsonl (for sim_speculation.py)")
    return ap.parse_args(argv)


class Lockstep:
    """The policy without its stream: a batched search then runs in waves (one generate call per
    iteration for all problems), as it did before continuous feeding."""

    def __init__(self, policy):
        self.__dict__["_policy"] = policy

    def __getattr__(self, name):
        if name == "stream":
            raise AttributeError(name)
        return getattr(self._policy, name)

    def __setattr__(self, name, value):
        setattr(self._policy, name, value)


class Recording:
    """The policy, keeping the prompt of every request (generate calls and stream requests alike)."""

    def __init__(self, policy):
        self.__dict__.update(_policy=policy, prompts=[])

    def __getattr__(self, name):
        if name == "stream":  # only where the policy has one
            opened = self._policy.stream

            def stream():
                s = opened()

                def add(prompts, sampling, seeds, add=s.add):
                    self.prompts.extend(prompts)
                    return add(prompts, sampling, seeds)
                s.add = add
                return s
            return stream
        return getattr(self._policy, name)

    def __setattr__(self, name, value):
        setattr(self._policy, name, value)

    def generate(self, prompts, sampling, seeds):
        self.prompts.extend(prompts)
        return self._policy.generate(prompts, sampling, seeds)


def peak_rate(policy, prompts: list[str], sampling, seed: int) -> float:
    """Generated tokens/s of one batched call on `prompts`, no stop, after a one-token call on them
    (their prefixes are then cached, as a search's mostly are)."""
    from ttc_mlops.search.common import sample_seed

    seeds = [sample_seed(seed, "peak", i) for i in range(len(prompts))]
    policy.generate(prompts, dataclasses.replace(sampling, max_tokens=1), seeds)
    t = time.perf_counter()
    gens = policy.generate(prompts, sampling, seeds)
    return sum(g.num_tokens for g in gens) / (time.perf_counter() - t)


def critical_tokens(records, lookahead: int) -> int | None:
    """The longest chain of tokens that must be generated one after another: a step-level search's
    next iteration starts only when all of its group's candidates are back and scored (a problem's
    iteration for beam search and particle filtering, sweeps one after another; a subtree's for
    DVTS), so a chain takes the sum of its groups' longest steps; best-of-N's is its longest
    completion. No schedule that waits for what it depends on can decode in fewer engine steps.
    None with lookahead (its greedy steps are not kept as tokens in the tree)."""
    if lookahead:
        return None
    longest = 0
    for r in records:
        if not r.tree:
            longest = max(longest, max((t or 0 for t in r.completion_tokens), default=0))
            continue
        groups: dict[tuple, int] = {}
        for node in r.tree:
            key = (node.subtree, node.sweep or 0, node.iteration)
            groups[key] = max(groups.get(key, 0), node.tokens)
        chains: dict[object, int] = {}
        for (subtree, _, _), tokens in groups.items():
            chains[subtree] = chains.get(subtree, 0) + tokens
        longest = max(longest, max(chains.values(), default=0))
    return longest


def same_record(a, b) -> bool:
    return same_samples(a, b) and a.step_scores == b.step_scores


def same_samples(a, b) -> bool:
    """The same completions, token counts and finish reasons (the PRM's scores may still differ in
    their last bits: its batches, and so its padding and matmul shapes, follow the schedule)."""
    return (a.completions, a.finish_reasons, a.completion_tokens) == (b.completions, b.finish_reasons, b.completion_tokens)


def score_gap(a, b) -> float:
    """The largest difference between two records' step scores, where they have the same shape."""
    gaps = [abs(x - y) for sa, sb in zip(a.step_scores, b.step_scores) if len(sa) == len(sb)
            for x, y in zip(sa, sb)]
    return max(gaps, default=0.0)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    strategies = [s for s in args.strategies.split(",") if s]
    sequential = {s for s in args.sequential.split(",") if s}
    base = {"model_path": args.model, "prm_path": args.prm, "prm_family": args.prm_family, "backend": args.backend,
            "prm_backend": args.prm_backend,
            "dtype": args.dtype,
            "dataset_name": args.data, "num_samples": args.problems, "n": args.n, "beam_width": args.beam_width,
            "num_iterations": args.num_iterations, "max_tokens": args.max_tokens, "seed": args.seed,
            "prm_batch_size": args.prm_batch_size, "search_batch_size": args.problems,
            "vllm_enforce_eager": {"auto": None, "true": True, "false": False}[args.vllm_enforce_eager]}
    recipes = {s: build_recipe({**base, "approach": s}, source="bench_search flags") for s in strategies}

    from ttc_mlops.data import load_dataset_problems
    from ttc_mlops.policy import Sampling, Streaming, load_policy
    from ttc_mlops.prm import load_prm
    from ttc_mlops.runner import metered
    from ttc_mlops.strategies import STRATEGIES

    first = next(iter(recipes.values()))
    problems = load_dataset_problems(first)[: args.problems]
    policy, prm = load_policy(first.policy_settings), load_prm(first.prm_settings)
    log.info("policy %s (%s), PRM %s, %d problems", policy.name, type(policy).__name__, prm.name, len(problems))

    # the backend's peak: one batched sampling call of problems x n rows, no stop, prompts already
    # run (a search's prompts mostly are), so mostly the batched decoding rate
    prompts = [policy.chat_prompt(first.system_prompt, p.problem) for p in problems for _ in range(args.n)]
    peak_sampling = Sampling(first.temperature, first.top_p, args.peak_tokens)
    peak = peak_rate(policy, prompts, peak_sampling, args.seed)
    log.info("peak batched sampling: %.1f tok/s (%d rows x %d tokens)", peak, len(prompts), args.peak_tokens)

    streams = isinstance(policy, Streaming)  # else batched search already runs in lockstep
    rows = []
    context_peak: dict[str, float] = {}
    critical: dict[str, int | None] = {}  # strategy -> its critical path in tokens
    for name in strategies:
        step_level = STRATEGIES[name].tree
        # a transformers backend set to run in waves (HFPolicy.continuous = False): its continuous
        # schedule is then the one compared against the batched run
        continuous = getattr(policy, "continuous", None) is False and step_level and args.lockstep
        modes = (["batched"] + (["lockstep"] if streams and step_level and args.lockstep else [])
                 + (["continuous"] if continuous else []) + (["one-at-a-time"] if name in sequential else []))
        results = {}
        for mode in modes:
            if mode == "continuous":
                policy.continuous = True
            recording = Recording(policy)
            fed, scorer = metered(Lockstep(recording) if mode == "lockstep" else recording, prm)
            meter = fed.usage
            fed.clear_cache()  # no run profits from another's caches
            scorer.clear_cache()
            prm_before = prm.tokens_processed
            attended_before = (getattr(prm, "attended", 0), getattr(prm, "attended_alone", 0))  # StepwisePRM's
            t = time.perf_counter()
            batches = [[p] for p in problems] if mode == "one-at-a-time" else [problems]
            records = [r for batch in batches for r in STRATEGIES[name](batch, fed, scorer, recipes[name])]
            wall = time.perf_counter() - t
            prm_tokens = prm.tokens_processed - prm_before
            attended = getattr(prm, "attended", 0) - attended_before[0], getattr(prm, "attended_alone", 0) - attended_before[1]
            results[mode] = records
            if mode == "continuous":
                policy.continuous = False
            if mode == "batched":  # the rate the backend reaches on the contexts this search fed it
                if args.save_records:
                    from ttc_mlops.records import write_records

                    args.save_records.mkdir(parents=True, exist_ok=True)
                    log.info("records: %s", write_records(records, args.save_records / f"{name}.jsonl"))
                sent = recording.prompts
                at = [round(i * (len(sent) - 1) / max(len(prompts) - 1, 1)) for i in range(len(prompts))]
                fed.clear_cache()
                scorer.clear_cache()
                context_peak[name] = peak_rate(policy, [sent[i] for i in at], peak_sampling, args.seed)
                log.info("%s: peak at its own contexts %.1f tok/s", name, context_peak[name])
                critical[name] = critical_tokens(records, recipes[name].lookahead)
            rows.append({"strategy": name, "mode": mode, "problems/s": len(problems) / wall, "wall_s": wall,
                         "gen_s": meter.gen_s, "prm_s": meter.prm_s, "calls": meter.generate_calls,
                         "gen_tok": meter.completion_tokens,
                         "tok/s gen": meter.completion_tokens / meter.gen_s if meter.gen_s else 0.0,
                         "tok/s wall": meter.completion_tokens / wall,
                         "prm_tok/gen_tok": prm_tokens / max(meter.completion_tokens, 1),
                         "prm_attended/alone": attended[0] / attended[1] if attended[1] else 0.0})
            log.info("%s %s: %s", name, mode, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()})
        for mode in modes[1:]:  # per-request seeds: a problem's record should not depend on how it was fed
            pairs = list(zip(results["batched"], results[mode]))
            row = next(r for r in rows[-len(modes):] if r["mode"] == mode)
            row["same_records"] = f"{sum(same_record(a, b) for a, b in pairs)}/{len(problems)}"
            row["same_samples"] = f"{sum(same_samples(a, b) for a, b in pairs)}/{len(problems)}"
            row["score_gap"] = f"{max((score_gap(a, b) for a, b in pairs if same_samples(a, b)), default=0.0):.1e}"

    print(f"\nbackend {args.backend} ({type(policy).__name__}), model {args.model}, {len(problems)} problems, "
          f"n={args.n}, beam_width={args.beam_width}, num_iterations={args.num_iterations}, "
          f"max_tokens={args.max_tokens}; PRM {args.prm} on {type(getattr(prm, 'forward', prm)).__name__} "
          f"(--prm-backend {args.prm_backend})")
    print(f"peak batched sampling rate: {peak:.1f} tok/s ({len(prompts)} rows)\n")
    cols = ["strategy", "mode", "problems/s", "wall_s", "gen_s", "prm_s", "calls", "gen_tok", "tok/s gen",
            "tok/s wall", "prm_tok/gen_tok", "prm_attended/alone", "same_records", "same_samples", "score_gap"]
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print("  ".join(f"{v:>15.3f}" if isinstance(v, float) else f"{v:>15}" for v in cells))
    print()
    for name in strategies:
        mine = [r for r in rows if r["strategy"] == name]
        b = mine[0]
        print(f"{name}: generated tok/s / peak = {b['tok/s gen'] / peak:.2f} over generation time, "
              f"{b['tok/s wall'] / peak:.2f} over wall time; PRM tokens per generated token "
              f"{b['prm_tok/gen_tok']:.2f}; PRM positions attended / a padding-free pass "
              f"{b['prm_attended/alone']:.2f}")
        if name in context_peak:
            cp = context_peak[name]
            print(f"{name}: peak at its own contexts (as many of its requests, evenly spread, in one call) "
                  f"{cp:.1f} tok/s; generated tok/s / that = {b['tok/s gen'] / cp:.2f} over generation time, "
                  f"{b['tok/s wall'] / cp:.2f} over wall time")
            # the PRM shares the machine with decoding (one process, or one accelerator): a schedule
            # at best decodes at its own-context peak whenever the PRM is not running
            prm_s_per_tok = b["prm_s"] / max(b["gen_tok"], 1)
            ceiling = 1 / (1 / cp + prm_s_per_tok)
            print(f"{name}: PRM {1000 * prm_s_per_tok:.2f} ms per generated token ({b['prm_s']:.1f} s of "
                  f"{b['wall_s']:.1f} s wall)")
            print(f"{name}: ceiling over wall time with the PRM run in between (decoding at that peak whenever the "
                  f"PRM is not running, the PRM at this run's {b['prm_tok/gen_tok'] / prm_s_per_tok:.0f} tok/s) "
                  f"{ceiling:.1f} tok/s = {ceiling / peak:.2f} of the peak; this run reached "
                  f"{b['tok/s wall'] / ceiling:.2f} of that ceiling")
        if critical.get(name):
            print(f"{name}: critical path {critical[name]} tokens generated one after another (no schedule that waits "
                  f"for its dependencies decodes in fewer steps), so at most {b['gen_tok'] / critical[name]:.1f} rows "
                  f"a step on average, against the peak call's {len(prompts)}")
        for other in mine[1:]:
            print(f"{name}: batched / {other['mode']} throughput = {b['problems/s'] / other['problems/s']:.2f}x "
                  f"(problems with the same records: {other.get('same_records')}, "
                  f"the same samples: {other.get('same_samples')}, largest step-score difference among those: "
                  f"{other.get('score_gap')})")


if __name__ == "__main__":
    main()
