"""A fake OpenAI-compatible server: a real HTTP server on 127.0.0.1 that injects faults on demand.

It answers `/v1/chat/completions`, `/v1/completions` and `/v1/models` with OpenAI-shaped JSON
(ids, choices, finish_reason, usage), so the real `openai` backend is tested over real HTTP.
The Batch API too (`--batch-api`): `POST /v1/files` (multipart upload), `GET /v1/files/{id}`,
`GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}`; a batch is answered
line by line through the same `answer` function and faults as live requests.
Tests get it from the `fake_openai` fixture (tests/conftest.py); the client benchmark and a
person trying a stage by hand start it directly:

    python tests/fake_openai_server.py --port 8000 --latency 0.1
    python -m pipeline generate --backend openai --base-url http://127.0.0.1:8000/v1 ...
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import itertools
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# Faults one request can be given; see FakeOpenAIServer.faults.
FAULTS = ("429", "500", "503", "hang", "malformed", "drop", "400", "401", "402", "403", "404", "413", "422")
# Statuses answered with an OpenAI-shaped error body: (type, message).
ERRORS = {
    400: ("invalid_request_error", "This model's maximum context length was exceeded."),
    401: ("invalid_request_error", "Incorrect API key provided."),
    402: ("billing_error", "You exceeded your current quota; check your plan and billing details."),
    403: ("permission_error", "You are not allowed to use this model."),
    404: ("invalid_request_error", "The model does not exist."),
    413: ("invalid_request_error", "Request entity too large."),
    422: ("invalid_request_error", "Input contains content that our safety system does not allow."),
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
# What a batch reports on successive polls before it ends (one step per poll), as OpenAI's do.
BATCH_STEPS = ("validating", "in_progress", "finalizing")
# The errors a batch that ends badly reports, by its final status.
BATCH_ERRORS = {"failed": ("invalid_request", "The input file could not be processed."),
                "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
                "cancelled": ("batch_cancelled", "The batch was cancelled.")}

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
      (closes the connection without an answer), "400", "401", "402", "403", "404", "413", "422";
      None = answer.
    - `random_faults`: (probability, faults, seed): after `faults` and `fail_every`, each request
      gets one of those faults with that probability, drawn from its own seeded generator.
    - `top_logprobs`: request JSON -> {token: logprob}, returned as the first token's
      `top_logprobs` when a request asks for `logprobs` (None: never returned).
    - `fail_every` / `fail_with`: every k-th completion request gets fault `fail_with`.
    - `requests`: completion requests received (faulty ones included); `bodies`: their JSON;
      `authorizations`: the Authorization header of each, to check the key was really sent;
      `peak_in_flight`: the most completion requests the server held at once.
    - Batch API: `batch_steps`: the statuses a batch shows, one per poll, before it ends (default
      validating, in_progress, finalizing; () ends it at its first poll); `batch_outcome`: how it
      ends ("completed": every line answered through `answer` and `faults`, as live requests are,
      2xx lines to the output file, the rest to the error file; or "failed", "expired",
      "cancelled"); `batch_hold = True` keeps every batch in_progress. `files`, `batches`,
      `batch_creations`, `batch_polls`: what the server received.
    """

    def __init__(self, answer: Answer = echo_answer, latency: float = 0.0, port: int = 0):
        self.answer = answer
        # request JSON -> {token: logprob} of the first answer token, sent when a chat request
        # asks for `logprobs`; None: the server returns no logprobs, as many do.
        self.top_logprobs: Callable[[dict], dict[str, float]] | None = None
        self.latency = latency
        self.finish_reason = "stop"
        self.faults: list[str | None] = []
        self.fail_every: int | None = None
        self.fail_with = "500"
        self.random_faults: tuple[float, tuple[str, ...], int] | None = None
        self._fault_rng: random.Random | None = None
        self.in_flight = 0
        self.peak_in_flight = 0
        self.retry_after = "1"
        self.hang_seconds = DEFAULT_HANG_SECONDS
        self.requests = 0
        self.bodies: list[dict] = []
        self.authorizations: list[str] = []
        # The Batch API (see `_batch_*`): uploaded files by id; batches by id; how each ends.
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_creations = 0  # POST /v1/batches received
        self.batch_polls = 0  # GET /v1/batches/{id} received
        self.batch_steps: tuple[str, ...] = BATCH_STEPS  # statuses shown, one per poll, before the end
        self.batch_hold = False  # True: batches stay in_progress (a test kills its client meanwhile)
        self.batch_outcome = "completed"  # or "failed", "expired", "cancelled"
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
            if self.random_faults:
                probability, faults, seed = self.random_faults
                self._fault_rng = self._fault_rng or random.Random(seed)
                if self._fault_rng.random() < probability:
                    return self._fault_rng.choice(faults)
            return None

    def _enter(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _logprobs(self, body: dict, text: str) -> dict | None:
        """Chat `logprobs` for the first token, when asked (`logprobs: true`) and `top_logprobs` is set."""
        if not (body.get("logprobs") and self.top_logprobs):
            return None
        alternatives = self.top_logprobs(body)
        first = text.split()[0] if text.split() else ""
        return {"content": [{"token": first, "logprob": alternatives.get(first, -9.0), "bytes": None,
                             "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                              for t, lp in list(alternatives.items())[:int(body.get("top_logprobs") or 0)]]}]}

    def _completion_logprobs(self, body: dict, text: str) -> dict | None:
        """The legacy endpoint's `logprobs` (the count of alternatives asked for in `logprobs`)."""
        if not (body.get("logprobs") and self.top_logprobs):
            return None
        alternatives = dict(list(self.top_logprobs(body).items())[:int(body["logprobs"])])
        first = text.split()[0] if text.split() else ""
        return {"tokens": [first], "token_logprobs": [alternatives.get(first, -9.0)], "top_logprobs": [alternatives],
                "text_offset": [0]}

    def _completion(self, path: str, body: dict) -> dict:
        n = int(body.get("n") or 1)
        answer = self.answer(body)
        texts = [answer] if isinstance(answer, str) else list(answer)
        texts = list(itertools.islice(itertools.cycle(texts), n))
        chat = path.endswith("/chat/completions")
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "finish_reason": self.finish_reason, "logprobs": self._logprobs(body, t)}
                       for i, t in enumerate(texts)]
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        else:
            choices = [{"index": i, "text": t, "finish_reason": self.finish_reason,
                        "logprobs": self._completion_logprobs(body, t)} for i, t in enumerate(texts)]
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

    # ------------------------------------------------------------ the Batch API

    def _batch_store_file(self, data: bytes, filename: str, purpose: str) -> dict:
        with self._lock:
            file_id = f"file-fake{next(self._ids)}"
            self.files[file_id] = data
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}

    def _batch_create(self, body: dict, authorization: str) -> dict:
        with self._lock:
            self.batch_creations += 1
            batch_id = f"batch_fake{next(self._ids)}"
            batch = {"id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
                     "input_file_id": body.get("input_file_id"), "completion_window": body.get("completion_window"),
                     "status": self.batch_steps[0] if self.batch_steps else "in_progress",
                     "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                     "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
                     "_polls": 0, "_authorization": authorization}
            self.batches[batch_id] = batch
        return self._batch_public(batch)

    def _batch_poll(self, batch_id: str) -> dict | None:
        """The batch as a client polling it sees it now: one step further each poll, then the end."""
        with self._lock:
            self.batch_polls += 1
            batch = self.batches.get(batch_id)
            if batch is None or batch["status"] not in BATCH_STEPS or batch.get("_finishing"):
                return batch and self._batch_public(batch)  # unknown, ended, or being answered by another poll
            if self.batch_hold:
                batch["status"] = "in_progress"
                return self._batch_public(batch)
            batch["_polls"] += 1
            if batch["_polls"] < len(self.batch_steps):
                batch["status"] = self.batch_steps[batch["_polls"]]
                return self._batch_public(batch)
            batch["_finishing"] = True
        self._batch_finish(batch, self.batch_outcome)  # outside the lock: its lines take it one by one
        return self._batch_public(batch)

    def _batch_finish(self, batch: dict, ending: str) -> None:
        if ending != "completed":
            code, message = BATCH_ERRORS[ending]
            batch.update(status=ending, errors={"object": "list", "data": [{"code": code, "message": message,
                                                                            "param": None, "line": None}]})
            return
        output, errors = [], []
        for text in self.files.get(batch["input_file_id"], b"").decode("utf-8").splitlines():
            line = json.loads(text)
            result = self._batch_answer_line(line, batch["_authorization"])
            (output if result["response"] and result["response"]["status_code"] == 200 else errors).append(result)
        batch["request_counts"] = {"total": len(output) + len(errors), "completed": len(output), "failed": len(errors)}
        for key, lines in (("output_file_id", output), ("error_file_id", errors)):
            if lines:
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8")
                batch[key] = self._batch_store_file(data, "batch_output.jsonl", "batch_output")["id"]
        batch["status"] = "completed"

    def _batch_answer_line(self, line: dict, authorization: str) -> dict:
        """One input line answered as the live endpoint would answer it; faults apply per line."""
        body = line["body"]
        fault = self._next_fault(body, authorization)
        result = {"id": f"batch_req_fake{next(self._ids)}", "custom_id": line["custom_id"], "response": None,
                  "error": None}
        if fault is None:
            result["response"] = {"status_code": 200, "request_id": f"req-{next(self._ids)}",
                                  "body": self._completion(line["url"], body)}
        elif fault.isdigit():
            kind, message = ERRORS[int(fault)]
            result["response"] = {"status_code": int(fault), "request_id": f"req-{next(self._ids)}",
                                  "body": {"error": {"message": message, "type": kind, "param": None, "code": None}}}
        else:  # hang, drop, malformed: the line never got an answer
            result["error"] = {"code": "server_error", "message": f"the request failed ({fault})"}
        return result

    @staticmethod
    def _batch_public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}


def _multipart_fields(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{name: (filename, bytes)} of a multipart/form-data body, with the stdlib's email parser."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


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
            parts = self.path.rstrip("/").split("/")  # "", "v1", "files", id, "content"
            if self.path.rstrip("/") == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})
            elif parts[:3] == ["", "v1", "files"] and len(parts) in (4, 5) and parts[3] in server.files:
                data = server.files[parts[3]]
                if len(parts) == 5 and parts[4] == "content":
                    self._send_json(200, data)
                else:
                    self._send_json(200, {"id": parts[3], "object": "file", "bytes": len(data), "created_at": 0,
                                          "filename": "batch.jsonl", "purpose": "batch", "status": "processed"})
            elif parts[:3] == ["", "v1", "batches"] and len(parts) == 4 and parts[3] in server.batches:
                self._send_json(200, server._batch_poll(parts[3]))
            else:
                self._send_error(404)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path == "/v1/files":
                fields = _multipart_fields(self.headers.get("Content-Type", ""), raw)
                if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
                    return self._send_error(400)
                return self._send_json(200, server._batch_store_file(fields["file"][1], fields["file"][0] or "",
                                                                     "batch"))
            if self.path not in ("/v1/chat/completions", "/v1/completions", "/v1/batches"):
                return self._send_error(404)
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return self._send_error(400)
            if self.path == "/v1/batches":
                if body.get("input_file_id") not in server.files:
                    return self._send_error(404)
                return self._send_json(200, server._batch_create(body, self.headers.get("Authorization", "")))
            fault = server._next_fault(body, self.headers.get("Authorization", ""))
            server._enter(+1)
            try:
                return self._answer(fault, body)
            finally:
                server._enter(-1)

        def _answer(self, fault, body):
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
