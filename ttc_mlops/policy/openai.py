"""The served policy backend (`backend: openai`): any OpenAI-compatible completions server.

    python -m vllm.entrypoints.openai.api_server --model meta-llama/Llama-3.2-1B-Instruct --port 8000 --generation-config vllm
    ttc run recipes/Llama-3.2-1B-Instruct/beam_search.yaml --set backend=openai --set policy_base_url=http://host:8000/v1

The prompt is built here, as by every backend: `chat_prompt` applies the chat template of
`model_path`'s tokenizer (loaded locally, no weights), and the prompt is tokenized here the way
policy/vllm.py tokenizes it (no special tokens: the template holds the BOS) and sent as token ids,
so the server's tokenizer and chat template play no part. One request per prompt to
`{policy_base_url}/completions` with `n=1` and that prompt's own `seed` (so a problem's samples
ignore which batch, chunk or server they landed on), `max_tokens`, `temperature`, `top_p`, the
sampling's `stop` strings and `include_stop_str_in_output` (vLLM's; the stop string stays in the
text, as in-process). Against a vLLM server (float32, the same seeds) the tokens are the ones
in-process vLLM samples (tests/test_served_policy.py compares the records).

Finish reasons are policy/vllm.py's: "length" where the server says `length`; "stop" where a stop
string ended it (vLLM's `stop_reason`, SGLang's `matched_stop`, or the text ending in one);
"eos" where the model ended the answer. Token counts are the response's `usage`:
`completion_tokens` for the generation, `prompt_tokens` less `prompt_tokens_details.cached_tokens`
(sent by vLLM only when served with `--enable-prompt-tokens-details`) for what the server ran.

Requests run `policy_concurrency` at a time on daemon threads; `stream()` is continuous (requests
join the server's batch as a step-level search adds them). A 429, a 5xx, a refused connection or a
timeout is retried with exponential backoff (ttc_mlops/serving.py, shared with the served PRM),
after which one `PolicyServerError` names the URL, the status and the tries; any other answer fails
at once. The key is read from the environment variable
`policy_api_key_env` names and sent as a bearer token; it is never logged nor put in a message.
`check_server` (preflight) asks `GET /models` within seconds, before any run exists.
"""

from __future__ import annotations

import logging
import urllib.error
from concurrent.futures import FIRST_COMPLETED, Future, wait

from .. import serving
from ..config import PolicySettings, RecipeError
from ..serving import ServerError
from . import Generation, Sampling, chat_prompt, check_seeds

log = logging.getLogger(__name__)

TIMEOUT_S = 600.0  # one request: a long generation on a busy server takes minutes


class PolicyServerError(ServerError):
    """A policy server that stopped answering (or answered what no generation can be read from):
    one line naming the URL, the status and the tries."""


def _root(base_url: str) -> str:
    return base_url.rstrip("/")


def request(url: str, api_key_env: str, body: dict, timeout: float = TIMEOUT_S, retries: int | None = None,
            backoff: float | None = None) -> dict:
    """POST `body` to `url` with serving.py's retries; a PolicyServerError after the last try."""
    return serving.request(url, api_key_env, body, what="policy server", key_field="policy_api_key_env",
                           error=PolicyServerError, timeout=timeout, retries=retries, backoff=backoff)


def served_models(settings: PolicySettings, timeout: float = serving.CHECK_TIMEOUT_S) -> list[str]:
    """The model ids the server at `policy_base_url` serves (`GET /models`, one try), or a
    RecipeError on one line: unreachable, a refused key, not an OpenAI-compatible API root."""
    url = f"{_root(settings.base_url)}/models"
    where = f"policy_base_url={settings.base_url!r}"
    problem = None
    try:
        body = serving.call(url, settings.api_key_env, None, timeout)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            problem = f"{where}: GET {url} answered {err.code} {err.reason}; {serving.key_hint(settings.api_key_env, 'policy_api_key_env')}"
        elif err.code == 404:
            problem = (f"{where}: GET {url} answered 404 Not Found: not an OpenAI-compatible API root (expected the URL "
                       f"the server's /models and /completions hang under, e.g. http://host:8000/v1)")
        else:
            problem = f"{where}: GET {url} answered {serving.error_text(err)}"
    except serving.NO_ANSWER as err:
        reason = getattr(err, "reason", None) or err
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        problem = f"{where} cannot be reached ({reason}): start the server, or point policy_base_url at it"
    except ValueError:
        problem = f"{where}: GET {url} did not answer JSON: not an OpenAI-compatible API root"
    if problem is not None:
        raise RecipeError(problem)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise RecipeError(f"{where}: GET {url} answered no model list (`data`): not an OpenAI-compatible API root")
    return [str(m.get("id")) for m in data if isinstance(m, dict)]


def model_name(settings: PolicySettings, served: list[str]) -> str:
    """The id to ask the server for: `policy_model_name`, else `model_path` as written or as the
    local directory it resolves to (what `vllm serve DIR` serves under); a RecipeError naming what
    is served where the server has none of them."""
    from ..models import resolve_model

    wanted = [settings.model_name] if settings.model_name else list(dict.fromkeys([settings.path, resolve_model(settings.path)]))
    for name in wanted:
        if name in served:
            return name
    field = "policy_model_name" if settings.model_name else "model_path"
    shown = ", ".join(map(repr, served[:10])) + (f" and {len(served) - 10} more" if len(served) > 10 else "")
    raise RecipeError(f"{field}={wanted[0]!r} is not served by policy_base_url={settings.base_url!r}, which serves "
                      f"{shown or 'no model'}: set policy_model_name to the id it serves the weights of model_path under")


def check_server(settings: PolicySettings) -> str:
    """Preflight: the server answers within seconds, takes the key and serves the model; returns
    the model id requests will name."""
    return model_name(settings, served_models(settings))


class OpenAIPolicy:
    def __init__(self, settings: PolicySettings):
        from transformers import AutoConfig, AutoTokenizer

        from ..models import config_params, resolve_model

        self.name = settings.path
        self.settings = settings
        self.progress = None  # whole generations come back: progress moves per request
        self.url = f"{_root(settings.base_url)}/completions"
        self.model = check_server(settings)
        source = resolve_model(settings.path)
        self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
        if settings.chat_template is not None:
            self.tokenizer.chat_template = settings.chat_template
        try:  # the local config, where there is one: the same count as in-process (FLOPs)
            self.params = config_params(AutoConfig.from_pretrained(source, trust_remote_code=settings.trust_remote_code))
        except (OSError, ValueError):
            self.params = None
        self.prompt_tokens = 0  # prompt tokens the server ran (its prefix cache spares the rest, where it says so)
        self.prompt_tokens_full = 0  # every prompt token of every request
        self.pool = serving.RequestPool(settings.concurrency, 'ttc-policy')
        log.info("policy served by %s as %r (%d requests in flight at most)", settings.base_url, self.model,
                 settings.concurrency)

    def chat_prompt(self, system: str, user: str) -> str:
        return chat_prompt(self.tokenizer, system, user)

    def clear_cache(self) -> None:
        """Nothing: the server's prefix cache is the server's (others may share it), and no
        OpenAI-compatible call clears it."""

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        stream = self.stream()
        tickets = stream.add(prompts, sampling, seeds)
        done: dict[int, Generation] = {}
        while stream.busy():
            done.update(stream.collect())
        return [done[t] for t in tickets]

    def stream(self) -> ServerStream:
        """Continuous feeding: every request added goes out at once (up to `policy_concurrency`)."""
        return ServerStream(self)

    def _body(self, ids: list[int], sampling: Sampling, seed: int) -> dict:
        body = {"model": self.model, "prompt": ids, "n": 1, "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": int(seed) % (2**63)}
        if sampling.stop:
            body.update(stop=list(sampling.stop), include_stop_str_in_output=True)
        return body

    def _complete(self, ids: list[int], sampling: Sampling, seed: int) -> tuple[Generation, int]:
        """One request: its generation and the prompt tokens the server ran for it."""
        answer = request(self.url, self.settings.api_key_env, self._body(ids, sampling, seed))
        choices, usage = answer.get("choices"), answer.get("usage")
        if not choices or not isinstance(usage, dict) or usage.get("completion_tokens") is None:
            raise PolicyServerError(f"policy server {self.url} answered no {'choices' if not choices else 'usage'}: "
                                    f"expected an OpenAI completions response with `usage`")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        ran = int(usage.get("prompt_tokens", len(ids))) - int(cached)
        return self._generation(choices[0], int(usage["completion_tokens"]), sampling), ran

    def _generation(self, choice: dict, num_tokens: int, sampling: Sampling) -> Generation:
        text, finish = choice.get("text") or "", choice.get("finish_reason")
        matched = choice.get("stop_reason", choice.get("matched_stop"))  # vLLM's, SGLang's
        if finish == "length":
            return Generation(text=text, num_tokens=num_tokens, finish_reason="length")
        if finish != "stop":
            raise PolicyServerError(f"policy server {self.url} answered finish_reason={finish!r}: expected 'stop' "
                                    f"or 'length'")
        if isinstance(matched, str) and matched in sampling.stop:
            # a server that ignores include_stop_str_in_output has cut the stop string off: put it back
            return Generation(text=text if text.endswith(matched) else text + matched, num_tokens=num_tokens,
                              finish_reason="stop")
        if any(text.endswith(s) for s in sampling.stop):  # kept in the text: a stop string ended it
            return Generation(text=text, num_tokens=num_tokens, finish_reason="stop")
        if not sampling.stop or "stop_reason" in choice or "matched_stop" in choice:
            return Generation(text=text, num_tokens=num_tokens, finish_reason="eos")  # None or an end token's id
        raise PolicyServerError(f"policy server {self.url} answered finish_reason='stop' without saying whether a stop "
                                f"string or the end of the answer ended it (no stop_reason / matched_stop): expected a "
                                f"vLLM or SGLang server")


class ServerStream:
    """Requests go out as they are added (the pool bounds how many at once); `collect` waits until
    some have come back. Tickets in the order added, as `EngineStream` (policy/vllm.py)."""

    continuous = True

    def __init__(self, policy: OpenAIPolicy):
        self.policy = policy
        self.live: dict[Future, int] = {}
        self.next = 0

    def add(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[int]:
        check_seeds(prompts, seeds)
        if not prompts:
            return []
        ids = self.policy.tokenizer(prompts, add_special_tokens=False).input_ids
        self.policy.prompt_tokens_full += sum(map(len, ids))
        tickets = []
        for i, seed in zip(ids, seeds):
            ticket, self.next = self.next, self.next + 1
            self.live[self.policy.pool.submit(self.policy._complete, list(i), sampling, seed)] = ticket
            tickets.append(ticket)
        return tickets

    def busy(self) -> int:
        return len(self.live)

    def collect(self) -> list[tuple[int, Generation]]:
        if not self.live:
            return []
        finished, _ = wait(list(self.live), return_when=FIRST_COMPLETED)
        done = []
        for future in sorted(finished, key=self.live.__getitem__):
            ticket = self.live.pop(future)
            if future.exception() is not None:
                for other in self.live:  # the search stops: requests not yet sent are not sent
                    other.cancel()
                self.live.clear()
                raise future.exception()
            generation, ran = future.result()
            self.policy.prompt_tokens += ran
            done.append((ticket, generation))
        return done
