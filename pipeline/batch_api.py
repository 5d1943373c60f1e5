"""`--batch-api`: the OpenAI Batch API behind the same `stream` as live requests.

    python -m pipeline respond --backend openai --model gpt-4o-mini --batch-api --concurrency 2000

`backends.make_client` returns a `BatchClient` when a stage runs with `--batch-api`; it sits
where the live client sits (under the request cache and the spending limits), so the stage's
parser, filter, cache and resume see the same `Response` objects either way. Half the price on
OpenAI; any server that implements `/v1/files` and `/v1/batches` works too (the input file is
the format vLLM's `run-batch` reads as well). Without them: one line saying so.

How a stream goes:
- Requests are pulled `--concurrency` at a time (a *chunk*): a stage like `generate` builds each
  prompt from the pool as it is, so the next chunk is built only after this one's answers are
  in. One chunk is one batch, so a large `--concurrency` is what makes a batch worth its wait.
- Each request becomes one line of a JSONL input file (`custom_id`, `method`, `url`, `body`, the
  body exactly as a live request would send it), uploaded to `/v1/files` (purpose `batch`) and
  submitted to `/v1/batches` (completion window 24h). The batch is polled with a doubling
  interval, then the output and error files are downloaded and each line becomes a `Response`:
  200 -> answered; 400/422 -> rejected, as live; any other status or a line in the error file
  -> failed (a rerun asks again). A batch that ends failed, expired or cancelled stops the stage
  with one line naming the batch.
- `custom_id` is the request's content hash (the request cache's key), so a result matches its
  request whatever the stage calls it, and identical requests in one chunk are sent once.
- The batch id, its input file id and its custom ids are kept in `<out stem>.batch.json` (an
  atomic write) from submission until its results are consumed (or the stage stops reading
  them: `generate` once it has N). A killed or interrupted run, rerun, finds the batch again:
  requests whose hash a kept batch holds wait for that batch instead of being submitted again
  (the stages rebuild the same requests on resume). A batch no request of the run matches (the
  flags changed) stays in the file, and the run says so at the end.

The API key is never written: the state file holds ids and hashes only.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.backends import MAX_ERROR_CHARS, BackendOptions, OpenAIClient, Request, Response
from pipeline.errors import UserError
from pipeline.jsonl import path_beside, write_json_atomic

STATE_SUFFIX = "batch.json"  # data/alpaca_data.jsonl -> data/alpaca_data.batch.json
STATE_FORMAT = 1  # bumped when the state file's shape changes
COMPLETION_WINDOW = "24h"  # the only window the Batch API offers
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
INPUT_FILE_NAME = "batch_input.jsonl"
# Polls wait batch_poll_interval, doubling up to this: a batch takes minutes to hours, and one
# poll a minute still notices its end within a minute.
MAX_POLL_SECONDS = 60.0
# OpenAI's limit of requests in one batch; a larger --concurrency is split into batches this big.
MAX_BATCH_REQUESTS = 50_000
# Hex digits of the content hash used as custom_id: 128 bits, no collision at any data size.
ID_CHARS = 32
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
HTTP_OK = 200
REJECTED_STATUSES = (400, 422)  # as live: the server refused this one request; asking again cannot help


def state_path_for(out) -> Path | None:
    """Where a stage writing `out` keeps its batch state; None for a config without an output."""
    return path_beside(out, STATE_SUFFIX) if out else None


class BatchState:
    """The batches submitted and not yet consumed, in a small JSON file beside the output."""

    def __init__(self, path: Path | None):
        self.path = path
        self.batches: list[dict] = self._load()

    def _load(self) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            batches = data["batches"]
            if data.get("format") != STATE_FORMAT or not all(isinstance(b["id"], str) and isinstance(b["custom_ids"], list)
                                                             for b in batches):
                raise ValueError("unknown format")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: not a batch state file ({e}); delete it to submit the requests again") from None
        return batches

    def add(self, entry: dict) -> None:
        self.batches.append(entry)
        self._save()

    def drop(self, batch_ids: Iterable[str]) -> None:
        gone = set(batch_ids)
        if any(b["id"] in gone for b in self.batches):
            self.batches = [b for b in self.batches if b["id"] not in gone]
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        if self.batches:
            write_json_atomic(self.path, {"format": STATE_FORMAT, "batches": self.batches})
        elif self.path.is_file():
            self.path.unlink()


class BatchClient(OpenAIClient):
    """An `OpenAIClient` whose `stream` submits chunks of requests as batches instead of sending them."""

    def __init__(self, options: BackendOptions, state_path: Path | None):
        self.state = BatchState(state_path)  # first: a damaged file stops the stage before the client starts
        super().__init__(options)
        self.chunk_size = min(options.concurrency, MAX_BATCH_REQUESTS)
        self.endpoint = ENDPOINTS[self.api]
        self._results: dict[str, dict] = {}  # custom_id -> its result line, from a downloaded batch
        self._batch_of: dict[str, str] = {}  # custom_id -> the batch it was sent in
        self._matched: set[str] = set()  # ids of kept batches that requests of this run matched

    def custom_id(self, request: Request) -> str:
        from pipeline.cache import request_key

        return request_key(request, self.backend, self.model, self.api, self.base_url)[:ID_CHARS]

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]:
        source = iter(requests)
        while chunk := list(islice(source, self.chunk_size)):
            yield from self._chunk(chunk)

    def close(self) -> None:
        stale = [b["id"] for b in self.state.batches if b["id"] not in self._matched]
        if stale:
            print(f"note: {self.state.path} keeps batch {', '.join(stale)} from an earlier run, which no request of "
                  f"this run matched (changed flags?); delete the file if it is not needed", file=sys.stderr)
        super().close()

    # ------------------------------------------------------------ one chunk

    def _chunk(self, chunk: list[Request]) -> Iterator[Response]:
        ids = [self.custom_id(r) for r in chunk]
        used = self._collect(chunk, ids)
        yielded = 0
        try:
            for request, custom_id in zip(chunk, ids):
                response = self._to_response(request, self._batch_of.get(custom_id, "?"), self._results.get(custom_id))
                self.totals.add(response)
                yielded += 1
                yield response
        finally:
            # Consumed, or the stage stopped reading (it had what it needed, or it is stopping):
            # a rerun resumes from the stage's output, not from these results.
            self.totals.abandoned += len(chunk) - yielded
            self.state.drop(used)
            for custom_id in ids:  # a kept batch's other results stay for the chunks that ask for them
                self._results.pop(custom_id, None)
                self._batch_of.pop(custom_id, None)

    def _collect(self, chunk: list[Request], ids: list[str]) -> list[str]:
        """Make every id's result available: from a kept batch, or from a new one. Returns the batch ids used."""
        missing = {i for i in ids if i not in self._results}
        kept = [b for b in self.state.batches if missing & set(b["custom_ids"])]
        new = missing - {i for b in kept for i in b["custom_ids"]}
        for entry in kept:
            self._matched.add(entry["id"])
            print(f"batch {entry['id']}: picked up again from {self.state.path}", file=sys.stderr)
        if new:
            unique: dict[str, Request] = {}  # identical requests are sent once and share the answer
            for request, custom_id in zip(chunk, ids):
                if custom_id in new:
                    unique.setdefault(custom_id, request)
            entry = self._submit(list(unique.items()))
            self._matched.add(entry["id"])
            self.state.add(entry)
            kept.append(entry)
        for entry in kept:
            self._batch_of.update(dict.fromkeys(entry["custom_ids"], entry["id"]))
            try:
                batch = self._wait(entry["id"])
            except UserError:
                raise
            except BaseException:  # Ctrl-C, a stop signal: the batch runs on at the server
                again = f"picks it up again from {self.state.path}" if self.state.path else "submits its requests again"
                print(f"batch {entry['id']}: still running at {self.base_url}; rerunning the same command {again}",
                      file=sys.stderr)
                raise
            self._download(batch)
        return [entry["id"] for entry in kept]

    # ------------------------------------------------------------ the API calls

    def _submit(self, lines: list[tuple[str, Request]]) -> dict:
        text = "".join(json.dumps({"custom_id": custom_id, "method": "POST", "url": self.endpoint,
                                   "body": self.request_body(request)}, ensure_ascii=False) + "\n"
                       for custom_id, request in lines)
        upload = self._call(self._client.files.create(file=(INPUT_FILE_NAME, text.encode("utf-8"), "application/jsonl"),
                                                      purpose="batch"), "files")
        batch = self._call(self._client.batches.create(input_file_id=upload.id, endpoint=self.endpoint,
                                                       completion_window=COMPLETION_WINDOW), "batches")
        kept = f" (kept in {self.state.path} until its results are used)" if self.state.path else ""
        print(f"batch {batch.id}: {len(lines)} requests submitted to {self.base_url}{kept}", file=sys.stderr)
        return {"id": batch.id, "input_file_id": upload.id, "endpoint": self.endpoint, "model": self.model,
                "requests": len(lines), "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "custom_ids": [custom_id for custom_id, _ in lines]}

    def _wait(self, batch_id: str):
        delay = self.options.batch_poll_interval
        while True:
            batch = self._call(self._client.batches.retrieve(batch_id), "batches")
            if batch.status == "completed":
                return batch
            if batch.status not in RUNNING:
                self.state.drop([batch_id])  # a rerun submits anew rather than waiting on a dead batch
                raise UserError(self._ended_badly(batch))
            time.sleep(delay)
            delay = min(delay * 2, MAX_POLL_SECONDS)

    def _ended_badly(self, batch) -> str:
        errors = getattr(batch.errors, "data", None) or []
        why = "; ".join(f"{e.code or 'error'}: {e.message or ''}".strip() for e in errors[:1]) or {
            "expired": f"not finished within the {COMPLETION_WINDOW} completion window"}.get(batch.status, "no reason given")
        return self._scrub(f"batch {batch.id} {batch.status} at {self.base_url}: {why}; "
                           f"rerunning submits its requests again")

    def _download(self, batch) -> None:
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = self._call(self._client.files.content(file_id), "files")
            for text in content.content.decode("utf-8").splitlines():
                try:
                    line = json.loads(text)
                except ValueError:
                    continue  # a broken line leaves its request without a result: it fails, a rerun asks again
                if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                    self._results[line["custom_id"]] = line

    def _call(self, coroutine, what: str) -> Any:
        """Run one SDK call on the client's loop; errors become one line (the SDK retried what it could)."""
        import openai

        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
        except openai.NotFoundError:
            raise UserError(f"not found at {self.base_url}/{what}: this server does not offer the Batch API "
                            f"(or the batch is gone); run without --batch-api") from None
        except (openai.APIConnectionError, openai.APIStatusError) as e:
            self._raise_if_fatal(e)
            raise UserError(f"batch API: {self._describe(e)}; rerun to pick the batch up again") from None

    # ------------------------------------------------------------ results

    def _to_response(self, request: Request, batch_id: str, line: dict | None) -> Response:
        if line is None:
            return self._failure(request, 0, f"batch {batch_id}: no result for this request")
        answer = line.get("response") or {}
        status, body = answer.get("status_code"), answer.get("body")
        if status == HTTP_OK and isinstance(body, dict):
            return self._answered(request, batch_id, body)
        if isinstance(status, int):
            message = _error_message(body)
            if status in REJECTED_STATUSES:
                return self._failure(request, 0, f"request rejected at {self.base_url} ({status}) in batch "
                                                 f"{batch_id}: {message}", rejected=True)
            return self._failure(request, 0, f"HTTP {status} from {self.base_url} in batch {batch_id}: {message}")
        error = line.get("error") or {}
        return self._failure(request, 0, f"batch {batch_id}: {error.get('code') or 'error'}: {error.get('message') or ''}")

    def _answered(self, request: Request, batch_id: str, body: dict) -> Response:
        from openai.types import Completion
        from openai.types.chat import ChatCompletion

        try:
            parsed = (ChatCompletion if self.api == "chat" else Completion).model_validate(body)
        except ValueError as e:  # pydantic's ValidationError
            return self._failure(request, 0, f"malformed response in batch {batch_id}: {' '.join(str(e).split())}")
        if not parsed.choices:
            return self._failure(request, 0, f"malformed response in batch {batch_id}: no choices")
        return self._response(request, parsed, 0)


def _error_message(body) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return " ".join(str(message or body or "no message").split())[:MAX_ERROR_CHARS]
