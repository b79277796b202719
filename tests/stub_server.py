"""A tiny HTTP server on 127.0.0.1 for the served-model clients' unit tests (retries, errors,
request bodies): no model, no vLLM. The real servers are in the tests marked vllm."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Stub:
    """Answers from `routes`: path -> fn(body, headers) -> (status, json or bytes, headers). Records
    every request (`seen`: path, headers, body), hits per path, POST bodies, Authorization headers,
    and the most requests it held at once. `url` is its root plus `prefix`."""

    def __init__(self, routes, prefix: str = ""):
        self.routes, self.hits, self.bodies, self.auth, self.seen = routes, {}, [], [], []
        self.inflight = self.most = 0
        lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with lock:
                    stub.hits[self.path] = stub.hits.get(self.path, 0) + 1
                    stub.inflight += 1
                    stub.most = max(stub.most, stub.inflight)
                    stub.auth.append(self.headers.get("Authorization"))
                    stub.seen.append((self.path, dict(self.headers), body))
                    if body is not None:
                        stub.bodies.append(body)
                try:
                    status, payload, headers = stub.routes[self.path](body, self.headers)
                finally:
                    with lock:
                        stub.inflight -= 1
                raw = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client gave up (a timeout test)
                    pass

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{prefix}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def scripted(answers: list[tuple[int, dict]]):
    """A route answering (status, json) pairs in turn, the last one repeating."""

    def route(body, headers):
        status, payload = answers.pop(0) if len(answers) > 1 else answers[0]
        return status, payload, {}

    return route


def stub_fixture(make):
    """A fixture handing out stubs made by `make(arg)`, all closed after the test."""

    @pytest.fixture
    def stub():
        made = []

        def new(arg):
            made.append(make(arg))
            return made[-1]

        yield new
        for s in made:
            s.close()

    return stub
