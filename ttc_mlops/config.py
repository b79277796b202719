"""The one validated config of a search run.

    ttc validate recipes/SmolLM2-135M-Instruct/best_of_n.yaml --set n=8

Keys are exactly the `Recipe` field names, and follow huggingface/search-and-learn so its recipe
files load unchanged. YAML sets values, `--set key=value` overrides them. Validation is pure (no
I/O): whatever needs the disk or the network (dataset files, model directories) is checked by
`preflight` in the CLI, still before any model loads.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .names import model_label_of
from .strategies import STRATEGIES, strategy_fields

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
BUILTIN_DATASET = "builtin:math-mini"
BUILTIN_MATH500 = "builtin:math500"  # MATH-500 (MIT), shipped in the package: no Hub needed
STEP_DELIMITER = "\n\n"

SAL_SYSTEM_PROMPT = (
    "Solve the following math problem efficiently and clearly:\n\n"
    "- For simple problems (2 steps or fewer):\nProvide a concise solution with minimal explanation.\n\n"
    "- For complex problems (3 steps or more):\nUse this step-by-step format:\n\n"
    "## Step 1: [Concise description]\n[Brief explanation and calculations]\n\n"
    "## Step 2: [Concise description]\n[Brief explanation and calculations]\n\n"
    "...\n\n"
    "Regardless of the approach, always conclude with:\n\n"
    "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct.\n\n"
    "Where [answer] is just the final number or expression that solves the problem."
)

# Fields that only say which slice of the data a process handles; a search configuration (and so
# its parent run) is the recipe minus these.
CHUNK_FIELDS = ("dataset_start", "dataset_end", "chunk", "num_chunks", "output_dir", "parent_run_id")
# Fields that change nothing in the records a run produces.
NON_RESULT_FIELDS = CHUNK_FIELDS + (
    "push_to_hub", "hub_dataset_id", "hub_dataset_private", "overwrite_hub_revision",
    "num_proc", "experiment_name", "search_batch_size", "prm_batch_size", "gpu_memory_utilization",
    "prm_gpu_memory_utilization",
    "prefix_cache_gib",
    "trace_problems",  # what evaluate writes as MLflow traces, not what was searched
    "prm_base_url", "prm_api_key_env",  # where the PRM runs, not what it scores
    # where and how the policy's requests go (backend: openai), not what they sample: per-request
    # seeds make a server's tokens independent of its address, its name for the weights (model_path
    # names them) and the requests in flight; `backend` stays in the key (an SGLang server need not
    # sample what in-process vLLM does)
    "policy_base_url", "policy_api_key_env", "policy_model_name", "policy_concurrency",
)

# Result fields added after the first tracking stores: in a search key only when not at their default.
LATER_FIELDS = ("prm_backend", "vllm_enforce_eager")

# Fields that only some strategies read (the registry declares them): a best-of-N configuration has
# no beam width. They are left out of its parameters and of its search key (so they never split one
# configuration in two).
STRATEGY_FIELDS = strategy_fields()

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the field, the value and what is expected."""


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """What loading a model needs of a recipe. Backends and PRMs get this (or a subclass below),
    never the whole Recipe; the defaults are the Recipe's, written once there."""
    path: str  # Hub id, local directory or EMBEDDED_MODEL
    dtype: str
    device: str
    trust_remote_code: bool
    prefix_cache_gib: float  # keys/values kept between calls (transformers); 0 turns the reuse off
    enforce_eager: bool | None = None  # in-process vLLM engines: None eager on a CPU, vLLM's default elsewhere


@dataclass(frozen=True, kw_only=True)
class PolicySettings(ModelSettings):
    backend: str  # "auto" | "transformers" | "vllm" | "openai"
    chat_template: str | None  # Jinja; None keeps the tokenizer's own
    gpu_memory_utilization: float  # vLLM's share of the card
    seed: int  # vLLM's engine seed (every request carries its own)
    base_url: str | None = None  # backend openai: the server's API root (policy/openai.py)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding its key
    model_name: str | None = None  # the id it serves the weights under; None: model_path
    concurrency: int = 16  # requests in flight at once


@dataclass(frozen=True, kw_only=True)
class PRMSettings(ModelSettings):
    family: str | None  # None: looked up from `path`
    batch_size: int  # sequences per forward pass
    step_separator: str | None = None  # TRL PRMs: the text after every step; None: the checkpoint's own
    backend: str = "transformers"  # where the forward pass runs: "auto" | "transformers" | "vllm"
    gpu_memory_utilization: float = 0.4  # the vLLM PRM engine's share of the card
    base_url: str | None = None  # a vLLM pooling server that runs the forward pass (prm/remote.py)
    api_key_env: str = "VLLM_API_KEY"  # the environment variable holding its key


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # --- search (the symbols of Snell et al. / search-and-learn)
    approach: Literal[tuple(STRATEGIES)] = "best_of_n"  # a name of ttc_mlops.strategies.STRATEGIES
    n: int = Field(4, ge=1)  # N, completions per problem (the test-time compute budget)
    beam_width: int = Field(4, ge=1)  # M, expansions kept per beam
    num_iterations: int = Field(40, ge=1)  # maximum search depth, in steps
    lookahead: int = Field(0, ge=0)  # greedy steps rolled out before scoring (k)
    agg_strategy: Literal["last", "min", "prod", "mean"] = "last"  # step scores -> one score
    filter_duplicates: bool = False  # drop identical partial solutions before selection
    # Best N finished beams by score; the reference defaults to the first N to finish (often one-step
    # answers from the first iteration), so this default differs on purpose.
    sort_completed: bool = True
    apply_voting: bool = True  # evaluate majority / weighted voting besides the naive choice

    # --- compute-optimal routing (approach: compute_optimal; Snell et al. 2024, `ttc optimal`)
    # The (difficulty bin -> strategy, settings) table to apply: the run id of a `ttc optimal` run
    # (read from the copy it keeps under $TTC_CACHE/optimal/; `ttc fetch-table ID` fetches
    # it), or a path to its table.json. Routes run with the table's sampling settings; the recipe's
    # own temperature, max_tokens, ... apply only where a hand-written table leaves them out.
    optimal_table: str | None = None
    # best-of-N samples per problem whose mean PRM score picks its difficulty bin (no gold answer);
    # they are paid from the budget and join the final vote
    probe_n: int = Field(4, ge=1)
    # For a table chosen against FLOPs: FLOPs per problem, the probe's included. None: the budget is
    # n (completions per problem, the probe's included). n always caps a problem's completions.
    flops_budget: float | None = Field(None, gt=0)

    # --- particle filtering / particle Gibbs (approach: particle_filtering; Puri et al. 2025)
    # A particle's log-weight is the logit of its last step's PRM score; resampling draws in proportion
    # to softmax(log-weights / pf_temperature): 1 is the paper's, larger flattens, smaller sharpens.
    pf_temperature: float = Field(1.0, gt=0.0)
    pf_selection: Literal["argmax", "sample"] = "argmax"  # the answer: the heaviest particle, or one drawn by weight
    pg_iterations: int = Field(1, ge=1)  # sweeps of the filter; > 1 is particle Gibbs (budget n x sweeps)
    pg_reference_particles: int = Field(1, ge=1)  # particles a Gibbs sweep keeps from the sweep before

    # --- sampling
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(2048, ge=1)  # per completion (per step bound in step-level search)
    seed: int = 42
    system_prompt: str = SAL_SYSTEM_PROMPT
    custom_chat_template: str | None = None  # Jinja; None keeps the tokenizer's own

    # --- models
    model_path: str = "meta-llama/Llama-3.2-1B-Instruct"  # Hub id, local dir or EMBEDDED_MODEL
    prm_path: str = "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"
    prm_family: str | None = None  # overrides the family looked up from prm_path
    # TRL-trained PRMs (prm_family: trl): the text after every step, TRL's PRMConfig.step_separator;
    # None reads it from the checkpoint's training_args.bin, else TRL's default "\n"
    prm_step_separator: str | None = Field(None, min_length=1)
    backend: Literal["auto", "transformers", "vllm", "openai"] = "auto"  # openai: a server at policy_base_url
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    trust_remote_code: bool = False  # remote model code runs only when the recipe says so
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)  # vLLM's share, the PRM gets the rest
    # in-process vLLM engines (policy and PRM): true runs them eager, false compiles them (torch.compile;
    # on a GPU also CUDA graphs); None is vLLM's default (compiled) on a GPU and eager on a CPU, where
    # vLLM 0.32 recompiles at every start (about 50 s an engine: its compile cache does not load back)
    # for 1.15-1.25x faster decoding (docs/benchmarks.md). A result field: compiled kernels round otherwise
    vllm_enforce_eager: bool | None = None
    # backend: openai: the API root of an OpenAI-compatible server running the policy (`vllm serve`,
    # SGLang; docs/served.md), e.g. http://host:8000/v1. model_path still names the weights it serves:
    # its tokenizer and chat template build the prompts here. Its key is read from policy_api_key_env
    policy_base_url: str | None = None
    policy_api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (never logged)
    policy_model_name: str | None = None  # the id the server serves model_path under; None: model_path or its directory
    policy_concurrency: int = Field(16, ge=1)  # requests in flight at once
    # where the PRM's forward pass runs: transformers (this project's prefix store), vLLM in this process
    # (its pooling runner and prefix caching), or auto: vLLM on a GPU where the family runs there, else
    # transformers (on a CPU, vLLM's PRM was no faster over wall time; docs/prms.md has the figures)
    prm_backend: Literal["auto", "transformers", "vllm"] = "auto"
    # the vLLM PRM engine's share of the card, beside the policy's gpu_memory_utilization (preflight
    # checks both against what is free)
    prm_gpu_memory_utilization: float = Field(0.4, gt=0.0, le=1.0)
    # a vLLM server running the PRM's forward pass (`vllm serve PRM --runner pooling`, docs/served.md),
    # e.g. http://host:8001; None runs it in this process. Where it runs, not what it scores: a served
    # run joins the parent of the same recipe run in-process. Its key is read from prm_api_key_env
    prm_base_url: str | None = None
    prm_api_key_env: str = "VLLM_API_KEY"  # the environment variable holding it (never logged)
    search_batch_size: int = Field(25, ge=1)  # problems searched together (one generate call each step)
    prm_batch_size: int = Field(4, ge=1)  # sequences per PRM forward pass
    # GiB of keys/values the transformers policy and PRM each keep between calls, so a step-level
    # search runs only the new step of a prefix seen before; 0 turns the reuse off
    prefix_cache_gib: float = Field(2.0, ge=0.0)

    # --- data
    dataset_name: str = "HuggingFaceH4/MATH-500"  # Hub id, local .jsonl/.json/.parquet, BUILTIN_MATH500 or BUILTIN_DATASET
    dataset_config: str | None = None
    dataset_split: str = "test"
    dataset_start: int | None = Field(None, ge=0)
    dataset_end: int | None = Field(None, ge=1)
    num_samples: int | None = Field(None, ge=1)
    # a dataset whose problems lack a gold answer is refused before any model loads; false runs them
    # anyway (their records carry no verdict: nothing to grade)
    require_answers: bool = True
    dataset_levels: list[int] | None = None  # keep only problems of these MATH levels (1-5), before num_samples
    chunk: int | None = Field(None, ge=0)  # this process's chunk, 0-based
    num_chunks: int | None = Field(None, ge=1)

    # --- tracking and outputs
    experiment_name: str | None = None  # None: derived from the dataset name
    parent_run_id: str | None = None
    # problems per configuration whose search evaluate writes as MLflow traces (a stable sample;
    # every problem when there are fewer); 0 writes none. Records are never changed by it
    trace_problems: int = Field(32, ge=0)
    output_dir: str | None = None
    num_proc: int | None = Field(None, ge=1)  # accepted for search-and-learn's recipes; ignored
    push_to_hub: bool = False
    hub_dataset_id: str | None = None
    hub_dataset_private: bool = False
    overwrite_hub_revision: bool = False

    @model_validator(mode="after")
    def _cross_field(self) -> "Recipe":
        check = STRATEGIES[self.approach].check
        if check is not None:
            check(self)
        if self.dataset_start is not None and self.dataset_end is not None:
            if self.dataset_end <= self.dataset_start:
                raise ValueError(f"dataset_end={self.dataset_end} must be greater than "
                                 f"dataset_start={self.dataset_start}")
        if (self.chunk is None) != (self.num_chunks is None):
            raise ValueError(f"chunk={self.chunk} and num_chunks={self.num_chunks} go together")
        if self.chunk is not None and self.chunk >= self.num_chunks:
            raise ValueError(f"chunk={self.chunk} must be below num_chunks={self.num_chunks}")
        if self.chunk is not None and (self.dataset_start is not None or self.dataset_end is not None):
            raise ValueError("use either chunk/num_chunks or dataset_start/dataset_end, not both")
        for field in ("model_path", "prm_path"):
            value = getattr(self, field)
            if not looks_like_model_ref(value):
                raise ValueError(f"{field}={value!r} is neither a Hub id (org/name), a local "
                                 f"directory path, nor {EMBEDDED_MODEL!r}")
        if self.dataset_levels is not None and (not self.dataset_levels or not set(self.dataset_levels) <= set(range(1, 6))):
            raise ValueError(f"dataset_levels={self.dataset_levels} must be a non-empty list of MATH levels 1-5")
        if self.prm_base_url is not None and self.prm_backend == "transformers":
            raise ValueError(f"prm_base_url={self.prm_base_url!r} runs the PRM on a vLLM server, but "
                             f"prm_backend='transformers' runs it here; set one of them")
        _check_served(self)
        if self.vllm_enforce_eager is not None and self.backend in ("transformers", "openai") and (
                self.prm_backend == "transformers" or self.prm_base_url is not None):
            raise ValueError(f"vllm_enforce_eager={self.vllm_enforce_eager} sets how this process's vLLM engines run, "
                             f"but backend={self.backend!r} and the PRM ({'prm_base_url' if self.prm_base_url else 'prm_backend=transformers'}) "
                             f"start none; leave it unset or run one of them on vLLM (backend: vllm, prm_backend: vllm)")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("push_to_hub=true needs hub_dataset_id (org/name)")
        return self

    # --- derived values, never stored twice
    @property
    def search_key(self) -> str:
        """A short, deterministic id of the search configuration (the recipe minus chunk fields).
        A field added after tracking stores existed counts only when set away from its default, so
        a configuration keeps the parent run it had before the field was there."""
        params = {k: v for k, v in self.result_params().items()
                  if not (k in LATER_FIELDS and v == Recipe.model_fields[k].default)}
        payload = json.dumps(params, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def result_params(self) -> dict[str, Any]:
        """The fields that decide the records (what a parent run is keyed on)."""
        return {k: v for k, v in self.params().items() if k not in NON_RESULT_FIELDS}

    def params(self) -> dict[str, Any]:
        """Every field that applies to this recipe's strategy (the full recipe is its YAML)."""
        return {k: v for k, v in self.model_dump().items() if self.approach in STRATEGY_FIELDS.get(k, (self.approach,))}

    @property
    def subtrees(self) -> int:
        """N / M: DVTS's independent subtrees per problem."""
        return self.n // self.beam_width

    @property
    def dataset_label(self) -> str:
        name = self.dataset_name.rstrip("/").split("/")[-1].split(":")[-1]
        return re.sub(r"\.(jsonl|json|parquet)$", "", name)

    @property
    def model_label(self) -> str:
        return model_label_of(self.model_path)

    @property
    def policy_settings(self) -> PolicySettings:
        return PolicySettings(path=self.model_path, dtype=self.dtype, device=self.device,
                              trust_remote_code=self.trust_remote_code, prefix_cache_gib=self.prefix_cache_gib,
                              enforce_eager=self.vllm_enforce_eager,
                              backend=self.backend, chat_template=self.custom_chat_template,
                              gpu_memory_utilization=self.gpu_memory_utilization, seed=self.seed,
                              base_url=self.policy_base_url, api_key_env=self.policy_api_key_env,
                              model_name=self.policy_model_name, concurrency=self.policy_concurrency)

    @property
    def prm_settings(self) -> PRMSettings:
        return PRMSettings(path=self.prm_path, dtype=self.dtype, device=self.device,
                           trust_remote_code=self.trust_remote_code, prefix_cache_gib=self.prefix_cache_gib,
                           enforce_eager=self.vllm_enforce_eager,
                           family=self.prm_family, batch_size=self.prm_batch_size,
                           step_separator=self.prm_step_separator, backend=self.prm_backend,
                           gpu_memory_utilization=self.prm_gpu_memory_utilization,
                           base_url=self.prm_base_url, api_key_env=self.prm_api_key_env)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_served(r: "Recipe") -> None:
    """backend openai and policy_base_url go together; each served model's URL and key variable are
    checked alike (_check_server)."""
    if r.backend == "openai" and r.policy_base_url is None:
        raise ValueError("backend='openai' needs policy_base_url, the API root of the server running the policy "
                         "(e.g. http://127.0.0.1:8000/v1)")
    if r.policy_base_url is not None and r.backend != "openai":
        raise ValueError(f"policy_base_url={r.policy_base_url!r} is read by backend='openai' only, but "
                         f"backend={r.backend!r}: set backend=openai, or unset policy_base_url")
    _check_server("policy_base_url", r.policy_base_url, "policy_api_key_env", r.policy_api_key_env,
                  "http://127.0.0.1:8000/v1")
    _check_server("prm_base_url", r.prm_base_url, "prm_api_key_env", r.prm_api_key_env, "http://127.0.0.1:8001")


def _check_server(url_field: str, url: str | None, key_field: str, key_env: str, example: str) -> None:
    """The URL is http(s) and holds no credentials; the key field names a variable (its value is
    never echoed: it may be a key pasted there)."""
    if url is not None:
        scheme, _, rest = url.partition("://")
        if "@" in rest.split("/")[0]:
            shown = f"{scheme}://***@{rest.split('@', 1)[1]}"
            raise ValueError(f"{url_field}={shown!r} holds credentials: put the key in the environment variable "
                             f"that {key_field} names ({key_env!r}), never in the recipe")
        if scheme not in ("http", "https") or not rest or rest[0] in "/" or any(c.isspace() for c in url):
            raise ValueError(f"{url_field}={url!r} is not an http:// or https:// URL (expected e.g. {example})")
    if not _ENV_NAME.match(key_env):
        raise ValueError(f"{key_field} is not an environment variable name (letters, digits and _, not "
                         "starting with a digit): it names the variable holding the key, never the key itself")


def looks_like_model_ref(value: str) -> bool:
    """A syntactic check only: whether a directory exists is preflight's job."""
    if value == EMBEDDED_MODEL:
        return True
    if value.startswith(("/", "./", "../", "~")) or Path(value).suffix == "" and value.count("/") > 1:
        return True
    return bool(_HUB_ID.match(value))


MAX_RECIPE_BYTES = 128 << 10  # a recipe is a few dozen fields (a chat template is a few KB); a larger file is not one
MAX_ERRORS = 20  # problems listed in one error; the rest are counted
_SHORT = reprlib.Repr()  # bounded in depth and length (Python 3.12 takes these as arguments; 3.11 does not)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxtuple = 2, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlong = 40


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors / aliases: a recipe is flat, and nested aliases (a "billion laughs"
    file of a few hundred bytes) expand into gigabytes wherever the value is walked or printed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, f"YAML alias *{event.anchor} is not accepted in a recipe: write the value out",
                event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(text: str):
    """The value of a YAML text, refusing aliases (see `_NoAliasLoader`). Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one bounded line: where, and what."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())[:300]
    return f"line {mark.line + 1}, column {mark.column + 1}: {' '.join(str(problem).split())[:300]}"


def _short(value: Any) -> str:
    """A value for an error message: its repr, bounded in depth and length whatever it holds."""
    return _SHORT.repr(value)


def _format_error(err: ValidationError, source: str, overridden: set[str] = frozenset()) -> str:
    """One line per problem, naming the field, the value, where it came from and what is expected."""
    lines = []
    errors = err.errors(include_url=False, include_input=True)
    for e in errors[:MAX_ERRORS]:
        loc = ".".join(str(p) for p in e["loc"]) or "recipe"
        where = "--set" if e["loc"] and e["loc"][0] in overridden else source
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, Recipe.model_fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {loc!r} in {where} (not a Recipe field{hint})")
        elif e["type"] == "value_error" and not e["loc"]:
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{loc}={_short(e.get('input'))} in {where}: {e['msg'][:200]}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"... and {len(errors) - MAX_ERRORS} more problem(s) in {source}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value`; the value is read as YAML so `n=8`, `seed=null`, `filter_duplicates=true` work."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = read_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # Text fields keep the text as typed ("system_prompt=1" is the string "1").
    if key in Recipe.model_fields and Recipe.model_fields[key].annotation in (str, str | None):
        value = raw if value is not None else None
    return key, value


def build_recipe(data: dict[str, Any], overrides: list[str] | dict[str, Any] = (), source: str = "recipe") -> Recipe:
    merged = dict(data)
    items = list(overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides))
    for key, value in items:
        merged[key] = value
    try:
        return Recipe(**merged)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source, {key for key, _ in items})) from None


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe={str(path)!r}: no such file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe={str(path)!r} is {size} bytes: expected a YAML mapping of Recipe fields "
                          f"(at most {MAX_RECIPE_BYTES} bytes)")
    try:
        data = read_yaml(path.read_text()) or {}
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe={str(path)!r} is not a text file (byte {err.start} is not UTF-8): expected a YAML "
                          f"mapping of Recipe fields") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe={str(path)!r} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe={str(path)!r} must be a mapping of Recipe fields, got {type(data).__name__}")
    return build_recipe(data, overrides, source=str(path))


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(), sort_keys=False, allow_unicode=True, width=100)
