"""A request cache in front of any LLM client: the same request twice costs one call.

Used by the generating stages (generate, respond) so a rerun after a crash or a tweak to a
later stage does not pay for answers it already has. Each answer is one JSON file under
`cache_dir/<2 hex>/<sha256>.json`, written atomically (temporary file + `os.replace`), so a
`kill -9` leaves either the whole answer or nothing. Failed requests are never cached.

The key is the SHA-256 of the backend, model, API, every sampling parameter and the
messages or prompt: change any of them and the request is asked again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.backends import LLMClient, Request, Response, Totals
from pipeline.jsonl import write_json_atomic

# Bumped when the stored shape changes, so old entries miss instead of being misread.
CACHE_FORMAT = 1
# How many cache hits may wait while the inner client has requests in flight; past this the
# inner stream is ended (it finishes what it has) so hits reach the caller without delay.
MAX_PENDING_HITS = 64
# Response fields stored; `request` is the caller's and `cached` describes this run.
STORED_FIELDS = ("texts", "finish_reasons", "prompt_tokens", "completion_tokens", "request_id", "model", "backend")


def request_key(request: Request, backend: str, model: str, api: str) -> str:
    """SHA-256 over everything that changes the answer (not the caller's `key`)."""
    fields = dataclasses.asdict(request)
    del fields["key"]
    payload = {"format": CACHE_FORMAT, "backend": backend, "model": model, "api": api, "request": fields}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CachedClient:
    """Wraps `inner` (same `stream` API); hits come back with `cached=True` without calling it."""

    def __init__(self, inner: LLMClient, cache_dir: Path, enabled: bool = True):
        self.inner = inner
        self.cache_dir = Path(cache_dir)
        self.enabled = enabled
        self.backend = inner.backend
        self.model = inner.model
        self.api = getattr(inner, "api", "chat")
        self.hits = Totals()  # what the cache answered; the inner client counts the rest

    @property
    def totals(self) -> Totals:
        inner = self.inner.totals
        return Totals(requests=inner.requests + self.hits.requests, retries=inner.retries, failures=inner.failures,
                      cached=inner.cached + self.hits.cached, prompt_tokens=inner.prompt_tokens,
                      completion_tokens=inner.completion_tokens)

    def _path(self, request: Request) -> Path:
        digest = request_key(request, self.backend, self.model, self.api)
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def lookup(self, request: Request) -> Response | None:
        try:
            stored = json.loads(self._path(request).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # atomic writes leave no partial file, but a hand-edited one just misses
        return Response(request=request, cached=True, **{name: stored[name] for name in STORED_FIELDS})

    def store(self, response: Response) -> None:
        if response.error is not None or response.cached:
            return
        path = self._path(response.request)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {name: getattr(response, name) for name in STORED_FIELDS})

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]:
        if not self.enabled:
            for response in self.inner.stream(requests):
                yield response
            return
        source = iter(requests)
        hits: deque[Response] = deque()
        state = {"outstanding": 0, "exhausted": False}

        def misses() -> Iterator[Request]:
            # Pulled by the inner client when it has a free slot. A hit cannot be yielded from
            # here, so it waits in `hits`; when nothing is in flight to wake the caller (or
            # too many wait), this feed ends, the inner stream drains, and the hits go out.
            for request in source:
                hit = self.lookup(request)
                if hit is None:
                    state["outstanding"] += 1
                    yield request
                    continue
                hits.append(hit)
                if state["outstanding"] == 0 or len(hits) >= MAX_PENDING_HITS:
                    return
            state["exhausted"] = True

        while True:
            for response in self.inner.stream(misses()):
                state["outstanding"] -= 1
                self.store(response)
                yield response
                yield from self._drain(hits)
            yield from self._drain(hits)
            if state["exhausted"]:
                return

    def _drain(self, hits: deque) -> Iterator[Response]:
        while hits:
            hit = hits.popleft()
            self.hits.add(hit)  # counted before the caller sees it, in case the caller stops here
            yield hit

    def close(self) -> None:
        self.inner.close()
