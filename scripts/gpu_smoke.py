"""GPU smoke test: each strategy on 10 MATH-500 problems, with accuracy, tokens/s, wall time and
generated tokens/s as a fraction of the backend's peak batched sampling rate.

    python scripts/gpu_smoke.py                                    # Llama-3.2-1B-Instruct + RLHFlow PRM (Hub or --model/--prm dirs)
    python scripts/gpu_smoke.py --random-weights                   # no network, no weights: throughput only
    python scripts/gpu_smoke.py --random-weights --tiny --device cpu --problems 2   # the same code path on a CPU

Real mode runs recipes/Llama-3.2-1B-Instruct/{best_of_n,beam_search,dvts}.yaml (the reference
settings, n=4) on the first `--problems` problems, policy and PRM loaded once and shared by the
three strategies (vLLM where installed). It is sized to finish in under 8 minutes on one H100.

Where vLLM can run, every strategy is measured twice, once per PRM backend (`--prm-backend both`,
the default): the PRM on vLLM's pooling runner beside the policy's engine (`prm_backend: vllm`, its
share `prm_gpu_memory_utilization`), then, that engine shut down, on transformers with this
project's prefix store. Where it cannot, the PRM runs on transformers only, as before.

Random-weights mode (chosen by --random-weights, or by --mode auto when the weights cannot be
found) builds models with the architectures of Llama-3.2-1B (policy) and Llama-3.1-8B (PRM, in
RLHFlow's +/- format) from the configs below, with random weights and a synthetic word-level
tokenizer of Llama 3's vocabulary size. Random weights never write a step delimiter, so every step
is exactly `--tokens-per-step` tokens and every search runs `--num-iterations` steps: the
throughput is that of the real models' shapes; the accuracy is meaningless and is not reported.
`--tiny` shrinks both architectures so the whole path runs on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("gpu_smoke")

STRATEGIES = ("best_of_n", "beam_search", "dvts")

# The architectures (config.json of meta-llama/Llama-3.2-1B-Instruct and Llama-3.1-8B), minus the
# llama3 rope scaling, which changes no shape and no cost. Context capped at 8192 tokens.
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
LLAMA_3_1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64)  # vLLM's CPU attention needs head_dim >= 32

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["auto", "real", "random"], default="auto",
                    help="auto: real weights when they can be found, else random weights")
    ap.add_argument("--random-weights", action="store_true", help="same as --mode random")
    ap.add_argument("--tiny", action="store_true", help="random mode: shrink both architectures (CPU check)")
    ap.add_argument("--problems", type=int, default=10)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--model", default="meta-llama/Llama-3.2-1B-Instruct", help="real mode: Hub id or local dir")
    ap.add_argument("--prm", default="RLHFlow/Llama3.1-8B-PRM-Deepseek-Data", help="real mode: Hub id or local dir")
    ap.add_argument("--dataset", default=None,
                    help="problems: Hub id or .jsonl (default: HuggingFaceH4/MATH-500; random mode: the built-in set)")
    ap.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    ap.add_argument("--prm-backend", default="both", choices=["both", "auto", "vllm", "transformers"],
                    help="where the PRM runs; both: vLLM then transformers where vLLM can run, else transformers")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens-per-step", type=int, default=64, help="random mode")
    ap.add_argument("--num-iterations", type=int, default=4, help="random mode: steps per search")
    ap.add_argument("--peak-tokens", type=int, default=128,
                    help="tokens per row of the peak-rate call (problems x n rows, no stop)")
    ap.add_argument("--workdir", default=None, help="random mode: where the random models are written "
                                                    "(default $TTC_CACHE/gpu_smoke)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    args = ap.parse_args(argv)
    if args.random_weights:
        args.mode = "random"
    return args


def weights_found(name: str) -> bool:
    from transformers.utils import cached_file

    if Path(name).expanduser().is_dir():
        return (Path(name).expanduser() / "config.json").is_file()
    try:
        return cached_file(name, "config.json") is not None
    except Exception as err:  # offline, gated, not found: all mean "not here"
        log.info("%s: weights not reachable (%s)", name, type(err).__name__)
        return False


# --- random-weights mode

def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` ids and a Llama-3-like chat template; it
    keeps "+" and "-" as tokens (RLHFlow's PRM format) and needs no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + ["+", "-"] + [str(d) for d in range(10)]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|end_of_text|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[2:4]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def random_model_dir(name: str, arch: dict, tiny: bool, device: str, workdir: Path) -> Path:
    """A saved random-weight Llama with `arch` (bf16 on a GPU), built once per workdir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**arch, **TINY} if tiny else arch
    out = workdir / (name + ("-tiny" if tiny else ""))
    if (out / "config.json").is_file():
        return out
    tok = synthetic_tokenizer(shape["vocab_size"])
    config = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    log.info("building random %s (%s) on %s", out.name, dtype, device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    log.info("wrote %s in %.0f s", out, time.perf_counter() - t0)
    return out


class FixedSteps:
    """Random weights never write the step delimiter: every step request runs exactly `tokens`
    tokens and is reported as a step that ended at the delimiter, so searches run their full depth.
    A policy that streams (vLLM) keeps its stream, so the search is fed as it would be."""

    def __init__(self, policy, tokens: int):
        from ttc_mlops.policy import Streaming

        self.policy, self.tokens = policy, tokens
        self.name = getattr(policy, "name", "policy")
        if isinstance(policy, Streaming):
            self.stream = lambda: _FixedStream(self, policy.stream())

    def chat_prompt(self, system: str, user: str) -> str:
        return self.policy.chat_prompt(system, user)

    def clear_cache(self) -> None:
        self.policy.clear_cache()

    def request(self, sampling):
        """What the backend runs for `sampling`, and whether its outputs are rewritten as steps."""
        if not sampling.stop:  # a whole solution (best-of-N): the recipe's max_tokens
            return sampling, False
        return dataclasses.replace(sampling, max_tokens=self.tokens, stop=()), True

    def as_step(self, gen, sampling):
        from ttc_mlops.policy import Generation

        return Generation(gen.text + sampling.stop[0], gen.num_tokens, "stop")

    def generate(self, prompts, sampling, seeds):
        run, step = self.request(sampling)
        gens = self.policy.generate(prompts, run, seeds)
        return [self.as_step(g, sampling) for g in gens] if step else gens

    def __getattr__(self, name):  # counters (prompt_tokens, params, ...) are the backend's
        if name in ("policy", "stream"):
            raise AttributeError(name)
        return getattr(self.policy, name)


class _FixedStream:
    def __init__(self, fixed: FixedSteps, inner):
        self.fixed, self.inner, self.continuous = fixed, inner, inner.continuous
        self.steps: dict[int, object] = {}  # ticket -> the step sampling it stands for

    def add(self, prompts, sampling, seeds):
        run, step = self.fixed.request(sampling)
        tickets = self.inner.add(prompts, run, seeds)
        if step:
            self.steps.update(dict.fromkeys(tickets, sampling))
        return tickets

    def busy(self) -> int:
        return self.inner.busy()

    def collect(self):
        return [(t, self.fixed.as_step(g, self.steps.pop(t)) if t in self.steps else g) for t, g in self.inner.collect()]


def peak_rate(policy, recipe, problems, tokens: int) -> float:
    """Generated tok/s of one batched sampling call of problems x n rows, `tokens` each, no stop,
    prompts already run once (a search's prompts mostly are): the backend's decoding peak."""
    from ttc_mlops.policy import Sampling
    from ttc_mlops.search.common import sample_seed

    prompts = [policy.chat_prompt(recipe.system_prompt, p.problem) for p in problems for _ in range(recipe.n)]
    seeds = [sample_seed(recipe.seed, "peak", i) for i in range(len(prompts))]
    policy.generate(prompts, Sampling(recipe.temperature, recipe.top_p, 1), seeds)
    t = time.perf_counter()
    gens = policy.generate(prompts, Sampling(recipe.temperature, recipe.top_p, tokens), seeds)
    return sum(g.num_tokens for g in gens) / (time.perf_counter() - t)


# --- both modes

def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from ttc_mlops.config import BUILTIN_DATASET, load_recipe
    from ttc_mlops.data import load_dataset_problems
    from ttc_mlops.models import cache_dir, pick_device
    from ttc_mlops.policy import load_policy
    from ttc_mlops.prm import load_prm
    from ttc_mlops.runner import Usage, accuracy, run_search
    from ttc_mlops.strategies import STRATEGIES as REGISTERED

    strategies = [s for s in args.strategies.split(",") if s]
    missing = [s for s in strategies if s not in REGISTERED]
    if missing:
        log.error("strategies %s are not registered (available: %s)", missing, sorted(REGISTERED))
        return 2
    mode = args.mode
    if mode == "auto":
        mode = "real" if weights_found(args.model) and weights_found(args.prm) else "random"
    device = pick_device(args.device)
    overrides = {"num_samples": args.problems, "device": args.device, "backend": args.backend,
                 "experiment_name": "gpu-smoke"}
    if mode == "random":
        workdir = Path(args.workdir) if args.workdir else cache_dir() / "gpu_smoke"
        workdir.mkdir(parents=True, exist_ok=True)
        overrides |= {
            "model_path": str(random_model_dir("random-Llama-3.2-1B", LLAMA_3_2_1B, args.tiny, device, workdir)),
            "prm_path": str(random_model_dir("random-Llama-3.1-8B", LLAMA_3_1_8B, args.tiny, device, workdir)),
            "prm_family": "rlhflow", "dataset_name": args.dataset or BUILTIN_DATASET,
            "num_iterations": args.num_iterations, "max_tokens": args.tokens_per_step * args.num_iterations,
        }
        print("RANDOM WEIGHTS: throughput only; accuracy is meaningless and is not reported "
              f"({'tiny ' if args.tiny else ''}Llama-3.2-1B policy, Llama-3.1-8B PRM, "
              f"{args.tokens_per_step} tokens per step, {args.num_iterations} steps)", flush=True)
    else:
        overrides |= {"model_path": args.model, "prm_path": args.prm}
        if args.dataset:
            overrides["dataset_name"] = args.dataset
    extra = [o for o in args.overrides]

    recipes = {s: load_recipe(REPO / "recipes" / "Llama-3.2-1B-Instruct" / f"{s}.yaml",
                              [f"{k}={v}" for k, v in overrides.items()] + extra) for s in strategies}
    first = recipes[strategies[0]]
    problems = load_dataset_problems(first)[: args.problems]
    t0 = time.perf_counter()
    policy = load_policy(first.policy_settings)
    load_s = time.perf_counter() - t0
    if mode == "random":
        policy = FixedSteps(policy, args.tokens_per_step)
    print(f"policy {first.model_path} ({type(getattr(policy, 'policy', policy)).__name__}), PRM {first.prm_path}, "
          f"{len(problems)} problems, device {device}, policy loaded in {load_s:.0f} s", flush=True)

    peak = peak_rate(policy, first, problems, args.peak_tokens)
    print(f"peak batched sampling: {peak:.1f} tok/s ({len(problems) * first.n} rows x {args.peak_tokens} tokens)",
          flush=True)

    rows = []
    for prm_backend in prm_backends(args.prm_backend, first):
        t0 = time.perf_counter()
        prm = load_prm(first.model_copy(update={"prm_backend": prm_backend}).prm_settings)
        prm_load_s = time.perf_counter() - t0
        load_s += prm_load_s
        on = type(getattr(prm, "forward", prm)).__name__
        print(f"PRM on {on} (prm_backend {prm_backend}), loaded in {prm_load_s:.0f} s", flush=True)
        for name in strategies:
            recipe = recipes[name]
            meter = Usage()
            t = time.perf_counter()
            # the run loop of `ttc run`: search batches, each from empty caches (no strategy profits from another's)
            records = run_search(recipe, problems, policy, prm, usage=meter)
            wall = time.perf_counter() - t
            acc = accuracy(records)[0] if mode == "real" else None
            rows.append((name, prm_backend, f"n={recipe.n}" + (f" M={recipe.beam_width}" if name != "best_of_n" else ""),
                         "n/a" if acc is None else f"{acc:.2f}", meter.completion_tokens,
                         meter.completion_tokens / wall, wall, meter.gen_s, meter.prm_s,
                         meter.completion_tokens / meter.gen_s / peak if meter.gen_s else 0.0,
                         meter.completion_tokens / wall / peak,
                         1000 * meter.prm_s / max(meter.completion_tokens, 1)))
            print(f"{name} (PRM on {prm_backend}): {wall:.1f} s", flush=True)
        free_prm(prm)

    # fraction of peak: generated tokens/s over generation time (the backend's use of its batch) and
    # over wall time (what the search gets, PRM included), against the peak measured above
    header = ("strategy", "PRM on", "budget", "accuracy", "tokens", "tokens/s", "wall s", "generate s", "PRM s",
              "gen/peak", "wall/peak", "PRM ms/tok")
    print(f"{header[0]:<12} {header[1]:<12} {header[2]:<9} {header[3]:>8} {header[4]:>8} {header[5]:>9} {header[6]:>7} "
          f"{header[7]:>10} {header[8]:>6} {header[9]:>8} {header[10]:>9} {header[11]:>10}")
    for r in rows:
        print(f"{r[0]:<12} {r[1]:<12} {r[2]:<9} {r[3]:>8} {r[4]:>8} {r[5]:>9.1f} {r[6]:>7.1f} {r[7]:>10.1f} "
              f"{r[8]:>6.1f} {r[9]:>8.2f} {r[10]:>9.2f} {r[11]:>10.2f}")
    print(f"peak {peak:.1f} tok/s")
    print(f"total {sum(r[6] for r in rows) + load_s:.0f} s (models {load_s:.0f} s)"
          + ("; RANDOM WEIGHTS: accuracy not measured" if mode == "random" else ""))
    return 0


def prm_backends(requested: str, recipe) -> list[str]:
    """The PRM backends to measure: `both` is vLLM then transformers where vLLM can run the PRM, else
    transformers alone (the random-weight measurements of a machine without vLLM stay as they were)."""
    if requested != "both":
        return [requested]
    from ttc_mlops.policy import vllm as vllm_backend

    usable, why = vllm_backend.available(recipe.prm_settings)
    if not usable:
        log.info("PRM on transformers only: %s", why)
        return ["transformers"]
    return ["vllm", "transformers"]


def free_prm(prm) -> None:
    """Give the PRM's memory back before the next backend's PRM loads (they would not both fit
    beside the policy on one card)."""
    import gc

    from ttc_mlops import models

    if type(getattr(prm, "forward", None)).__name__ == "VLLMForward":
        from ttc_mlops.prm import vllm as prm_vllm

        prm_vllm.release()
    else:  # a causal LM PRM is kept in the process's model cache, shared with a transformers policy
        for key in [k for k, v in models._LOADED.items() if v[0] is getattr(prm, "model", None)]:
            del models._LOADED[key]
    del prm
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
