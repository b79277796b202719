"""JSON over HTTP to a model server: one retry policy and one way of naming what failed, for the
served policy (policy/openai.py) and the served PRM (prm/remote.py).

    python -c "from ttc_mlops import serving; print(serving.RETRIES, serving.BACKOFF_S)"

A 429, a 5xx, a refused or dropped connection, a cut-off answer or a timeout is retried RETRIES
times with exponential backoff (BACKOFF_S, doubled after every retry, at most MAX_WAIT_S, or the
server's Retry-After), each wait spread by a random 0.8-1x so that the tasks of a sweep do not come
back at once; after the last try one error names the URL, what it answered and the tries. Anything
else (a 4xx, an answer that is not JSON) fails at once. The key is read from the environment
variable the recipe names, sent as a bearer token, and never logged nor put in a message.
Requests in flight run on a `RequestPool` of daemon threads.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 5.0  # preflight's requests: an unreachable server is found in seconds
RETRIES = 5  # tries after the first, for a 429, a 5xx, a refused connection or a timeout
BACKOFF_S = 0.5  # the first wait; doubled after every retry (0.5 + 1 + 2 + 4 + 8 = 15.5 s in all)
MAX_WAIT_S = 30.0  # the longest single wait, a server's Retry-After included
RETRY_STATUS = {429, 500, 502, 503, 504}
NO_ANSWER = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


class ServerError(RuntimeError):
    """A model server that stopped answering, or answered what cannot be read: one line naming the
    URL, what it answered and the tries."""


def headers(api_key_env: str) -> dict[str, str]:
    found = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get(api_key_env)
    if key:
        found["Authorization"] = f"Bearer {key}"
    return found


def error_text(err: urllib.error.HTTPError) -> str:
    """The status and what the server said with it, on one bounded line (vLLM and OpenAI answer
    {"error": {"message": ...}})."""
    try:
        raw = err.read() or b"{}"
        body = json.loads(raw)
        detail = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        detail = raw.decode(errors="replace")
    except OSError:
        detail = ""
    text = " ".join(str(detail).split())[:300]
    return f"{err.code} {err.reason}" + (f": {text}" if text else "")


def key_hint(api_key_env: str, field: str) -> str:
    """What to do about a refused key (the variable named, never its value)."""
    if os.environ.get(api_key_env):
        return f"the key in ${api_key_env} was refused: set it to the server's key (or {field} to the variable holding it)"
    return f"${api_key_env} is not set: set it to the server's key (or {field} to the variable holding it)"


def no_answer(err: BaseException, timeout: float) -> str:
    reason = getattr(err, "reason", None) or err  # a refused connection, a cut-off answer
    if isinstance(reason, TimeoutError):
        return f"no answer (timed out after {timeout:g} s)"
    return f"no answer ({reason})"


def call(url: str, api_key_env: str, body: dict | None, timeout: float) -> dict:
    """One GET (body None) or POST, decoded; urllib's errors pass through."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers(api_key_env),
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def request(url: str, api_key_env: str, body: dict | None = None, *, what: str, key_field: str, timeout: float,
            error: type[ServerError] = ServerError, retries: int | None = None, backoff: float | None = None) -> dict:
    """GET (body None) or POST `url`, retried as the module docstring says; `error` after the last
    try, reading "{what} {url} failed: {what it answered}, after {n} tries" (raised outside any
    `except`, so no library error rides along as its context). `retries` / `backoff` default to
    RETRIES / BACKOFF_S as they are when called."""
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF_S if backoff is None else backoff
    failure = ""
    for attempt in range(retries + 1):
        wait_s = backoff * 2**attempt
        try:
            return call(url, api_key_env, body, timeout)
        except urllib.error.HTTPError as err:
            failure = error_text(err)
            if err.code in (401, 403):
                failure += f" ({key_hint(api_key_env, key_field)})"
                break
            if err.code not in RETRY_STATUS:
                break
            after = err.headers.get("Retry-After") if err.headers else None
            if after is not None and after.strip().isdigit():
                wait_s = float(after)
        except NO_ANSWER as err:
            failure = no_answer(err, timeout)
        except ValueError:  # not JSON: a proxy's page, say
            failure = "an answer that is not JSON"
            break
        if attempt < retries:
            pause = min(wait_s, MAX_WAIT_S) * random.uniform(0.8, 1.0)
            log.warning("%s %s: %s; retry %d of %d in %.1f s", what, url, failure, attempt + 1, retries, pause)
            time.sleep(pause)
    tries = attempt + 1
    raise error(f"{what} {url} failed: {failure}, after {tries} {'try' if tries == 1 else 'tries'}")


class RequestPool:
    """`size` daemon threads running submitted calls (at most `size` requests in flight). Daemon
    threads, unlike a ThreadPoolExecutor's: a process stopped mid-search (SIGTERM, Ctrl-C) does not
    wait at exit for requests still out to a server that may hang."""

    def __init__(self, size: int, name: str):
        self.size, self.name, self.jobs, self.threads = size, name, queue.SimpleQueue(), []

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self.jobs.put((future, fn, args))
        if len(self.threads) < self.size:
            thread = threading.Thread(target=self._work, daemon=True, name=f"{self.name}-{len(self.threads)}")
            thread.start()
            self.threads.append(thread)
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 (handed to whoever collects it)
                future.set_exception(err)
