"""A fake OpenAI-compatible server: a real HTTP server on 127.0.0.1 that injects faults on demand.

It answers `/v1/chat/completions`, `/v1/completions` and `/v1/models` with OpenAI-shaped JSON
(ids, choices, finish_reason, usage), so the real `openai` backend is tested over real HTTP.
Tests get it from the `fake_openai` fixture (tests/conftest.py); the client benchmark and a
person trying a stage by hand start it directly:

    python tests/fake_openai_server.py --port 8000 --latency 0.1
    python -m pipeline generate --backend openai --base-url http://127.0.0.1:8000/v1 ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# Faults one request can be given; see FakeOpenAIServer.faults.
FAULTS = ("429", "500", "503", "hang", "malformed", "drop", "400", "401", "403", "404")
# Statuses answered with an OpenAI-shaped error body: (type, message).
ERRORS = {
    400: ("invalid_request_error", "This model's maximum context length was exceeded."),
    401: ("invalid_request_error", "Incorrect API key provided."),
    403: ("permission_error", "You are not allowed to use this model."),
    404: ("invalid_request_error", "The model does not exist."),
    429: ("rate_limit_error", "Rate limit reached; try again later."),
    500: ("server_error", "The server had an error while processing your request."),
    503: ("server_error", "The engine is currently overloaded."),
}
# A hung request waits this long (or until the server stops) before the connection closes:
# longer than any client timeout a test sets.
DEFAULT_HANG_SECONDS = 30.0
# The listen backlog: the benchmark opens 32 connections at once; the stdlib default is 5.
LISTEN_BACKLOG = 128
# How often serve_forever checks for shutdown; the stdlib's 0.5 s would add that to every test.
POLL_INTERVAL = 0.02

Answer = Callable[[dict], "str | list[str]"]


def echo_answer(body: dict) -> str:
    """The default answer: names the request, so tests can tell answers apart."""
    if "messages" in body:
        last = body["messages"][-1]["content"]
    else:
        last = body.get("prompt", "")
    return f"answer to: {str(last)[:60]}"


def _words(text: str) -> int:
    return len(str(text).split())


class FakeOpenAIServer:
    """The server and its knobs. Set attributes between (or during) requests:

    - `answer`: request JSON -> text, or a list of texts (one per choice; cycled to `n`).
    - `finish_reason`: what every choice reports ("stop", "length", "content_filter").
    - `latency`: seconds each answer waits before it is sent (the benchmark's 0.1).
    - `faults`: a list consumed one fault per completion request, from the front; one of
      "429" (with `Retry-After: retry_after`), "500", "503", "hang" (sends nothing for
      `hang_seconds`, then closes), "malformed" (a 200 with a truncated JSON body), "drop"
      (closes the connection without an answer), "400", "401", "403", "404"; None = answer.
    - `fail_every` / `fail_with`: every k-th completion request gets fault `fail_with`.
    - `requests`: completion requests received (faulty ones included); `bodies`: their JSON;
      `authorizations`: the Authorization header of each, to check the key was really sent.
    """

    def __init__(self, answer: Answer = echo_answer, latency: float = 0.0, port: int = 0):
        self.answer = answer
        self.latency = latency
        self.finish_reason = "stop"
        self.faults: list[str | None] = []
        self.fail_every: int | None = None
        self.fail_with = "500"
        self.retry_after = "1"
        self.hang_seconds = DEFAULT_HANG_SECONDS
        self.requests = 0
        self.bodies: list[dict] = []
        self.authorizations: list[str] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_fault(self, body: dict, authorization: str) -> str | None:
        with self._lock:
            self.requests += 1
            self.bodies.append(body)
            self.authorizations.append(authorization)
            if self.faults:
                return self.faults.pop(0)
            if self.fail_every and self.requests % self.fail_every == 0:
                return self.fail_with
            return None

    def _completion(self, path: str, body: dict) -> dict:
        n = int(body.get("n") or 1)
        answer = self.answer(body)
        texts = [answer] if isinstance(answer, str) else list(answer)
        texts = list(itertools.islice(itertools.cycle(texts), n))
        chat = path.endswith("/chat/completions")
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "finish_reason": self.finish_reason, "logprobs": None} for i, t in enumerate(texts)]
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        else:
            choices = [{"index": i, "text": t, "finish_reason": self.finish_reason, "logprobs": None}
                       for i, t in enumerate(texts)]
            prompt = str(body.get("prompt", ""))
        completion_tokens = sum(_words(t) for t in texts)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-fake{next(self._ids)}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": choices,
            "usage": {"prompt_tokens": _words(prompt), "completion_tokens": completion_tokens,
                      "total_tokens": _words(prompt) + completion_tokens},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must not keep the test process alive
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request, client_address):
        # A client that timed out or was cancelled closes its socket mid-answer: expected here.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(server: FakeOpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
        # Headers and body go out in two writes; with Nagle's algorithm on, the client's
        # delayed ACK adds ~40 ms to every answer.
        disable_nagle_algorithm = True

        def log_message(self, format, *args):  # quiet: tests capture stderr
            pass

        def _send_json(self, status: int, payload, headers: dict | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", f"req-{next(server._ids)}")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _send_error(self, status: int) -> None:
            kind, message = ERRORS[status]
            headers = {"Retry-After": server.retry_after} if status == 429 else None
            self._send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}},
                            headers)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})
            else:
                self._send_error(404)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                return self._send_error(400)
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                return self._send_error(404)
            fault = server._next_fault(body, self.headers.get("Authorization", ""))
            if server.latency:
                time.sleep(server.latency)
            if fault is None:
                return self._send_json(200, server._completion(self.path, body))
            if fault == "hang":
                server._stopping.wait(server.hang_seconds)
                self.close_connection = True
                return None
            if fault == "drop":
                self.close_connection = True  # the handler returns without a byte: the client sees a disconnect
                return None
            if fault == "malformed":
                return self._send_json(200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
            return self._send_error(int(fault))

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    server = FakeOpenAIServer(latency=args.latency, port=args.port)
    print(f"fake OpenAI server at {server.base_url} (Ctrl-C stops it)", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
