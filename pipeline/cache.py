"""A request cache in front of any LLM client: the same request twice costs one call.

Used by the generating stages (generate, respond) so a rerun after a crash or a tweak to a
later stage does not pay for answers it already has. Each answer is one JSON file under
`cache_dir/<2 hex>/<sha256>.json`, written atomically (temporary file + `os.replace`), so a
`kill -9` leaves either the whole answer or nothing; the temporary file such a kill leaves
behind is removed by the next run that opens the cache. Failed and rejected requests are
never cached. `backends.open_client` puts this layer in; `check_cache_dir` runs first, so an
unusable `--cache-dir` stops the stage before the first (paid) request.

The key is the SHA-256 of the backend, the server URL (without credentials), model, API,
every sampling parameter and the messages or prompt: change any of them and the request is
asked again. Another server never replays this one's answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.backends import LLMClient, Request, Response, Totals
from pipeline.jsonl import check_output_folder, write_json_atomic

# Bumped when the stored shape changes, so old entries miss instead of being misread.
CACHE_FORMAT = 1
# A temporary file older than this was left by a process that died mid-write (a write takes
# milliseconds); younger ones may belong to another run using the same cache right now.
STALE_TMP_SECONDS = 60
TMP_SUFFIX = ".tmp"  # what `jsonl.atomic_write` names its temporary files
# How many cache hits may wait while the inner client has requests in flight; past this the
# inner stream is ended (it finishes what it has) so hits reach the caller without delay.
MAX_PENDING_HITS = 64
# Response fields stored; `request` is the caller's and `cached` describes this run.
STORED_FIELDS = ("texts", "finish_reasons", "prompt_tokens", "completion_tokens", "request_id", "model", "backend",
                 "top_logprobs", "engine", "precision")
LATER_REQUEST_FIELDS = ("top_logprobs", "logprob_tokens", "response_format")


def request_key(request: Request, backend: str, model: str, api: str, base_url: str = "") -> str:
    """SHA-256 over everything that changes the answer (not the caller's `key`).

    `base_url` is the server's URL without credentials ("" for the local backend).
    """
    fields = dataclasses.asdict(request)
    del fields["key"]
    # Fields added to Request later are left out at their defaults, so answers cached before
    # they existed keep their keys.
    for name in LATER_REQUEST_FIELDS:
        if not fields.get(name):
            fields.pop(name, None)
    payload = {"format": CACHE_FORMAT, "backend": backend, "model": model, "api": api, "request": fields}
    if base_url:  # absent for the local backend, so its entries cached before servers were keyed still hit
        payload["base_url"] = base_url
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_cache_dir(cache_dir) -> Path:
    """Fail with one line naming --cache-dir if the cache cannot be written; creates nothing."""
    return check_output_folder(cache_dir, "--cache-dir")


def remove_stale_tmp(cache_dir: Path, now: float | None = None) -> int:
    """Delete temporary files a killed writer left in the cache; returns how many."""
    now = time.time() if now is None else now
    removed = 0
    if not cache_dir.is_dir():
        return 0
    for folder in os.scandir(cache_dir):
        if not folder.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(folder.path):
            if not entry.name.endswith(TMP_SUFFIX):
                continue
            with contextlib.suppress(FileNotFoundError):  # another run may remove it first
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS:
                    os.unlink(entry.path)
                    removed += 1
    return removed


class CachedClient:
    """Wraps `inner` (same `stream` API); hits come back with `cached=True` without calling it."""

    def __init__(self, inner: LLMClient, cache_dir: Path, enabled: bool = True, base_url: str = ""):
        self.inner = inner
        self.cache_dir = Path(cache_dir)
        self.enabled = enabled
        self.base_url = base_url
        self.backend = inner.backend
        self.model = inner.model
        self.api = getattr(inner, "api", "chat")
        self.hits = Totals()  # what the cache answered; the inner client counts the rest
        if enabled:
            remove_stale_tmp(self.cache_dir)

    @property
    def totals(self) -> Totals:
        inner = self.inner.totals
        return dataclasses.replace(inner, requests=inner.requests + self.hits.requests,
                                   cached=inner.cached + self.hits.cached)

    def _path(self, request: Request) -> Path:
        digest = request_key(request, self.backend, self.model, self.api, self.base_url)
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def lookup(self, request: Request) -> Response | None:
        try:
            stored = json.loads(self._path(request).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # atomic writes leave no partial file, but a hand-edited one just misses
        # An entry stored before a field existed lacks it and gets the field's default.
        return Response(request=request, cached=True, **{name: stored[name] for name in STORED_FIELDS if name in stored})

    def store(self, response: Response) -> None:
        if response.error is not None or response.cached:  # a failure may pass next time; a rejection is the stage's record
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
