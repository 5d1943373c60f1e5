"""The outermost layer of every stage's client: spending limits and the first-requests check.

`backends.open_client` puts `LimitedClient` around the cache and the backend, so every stage
that talks to a model (generate, respond, and the stages to come) gets the same two rules:

- **Spending limits** (`--max-tokens-total`, `--budget` with `--price-per-1k`). Before a
  request is pulled from the stage, the tokens already spent plus those reserved by the
  requests in flight must be under the limit; each request then reserves its `max_tokens`
  (times `n`) plus an estimate of its prompt, released when its answer comes back with the
  real count. So with `--concurrency 64 --max-tokens-total 500` one request goes out, not 64,
  and the overshoot is bounded by one request (the last one let through). Cache hits cost
  nothing. The stream then ends and `stopped` names the limit.
- **A server that does not work is said so at once.** When the first requests sent (not cache
  hits) all fail after their retries (connection refused, timeouts, 5xx) or are all rejected
  (400/422), no later request will fare better: the stage stops with the real error in one
  line (`cannot connect to http://127.0.0.1:9/v1: connection refused`), not after hundreds of
  attempts with a misleading guess. Failures are judged after min(8, concurrency) requests, so
  a dead server stops a stage within one request's retries (about 16 s with the defaults);
  rejections only after 8, since one rejected request is an ordinary event.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from pipeline.backends import BackendOptions, LLMClient, Request, Response, Totals
from pipeline.errors import UserError

# How many first requests must all fail (or all be rejected) before the stage gives up.
FIRST_REQUESTS_CHECKED = 8
TOKENS_PER_1K = 1000
# Before any answer says how prompts tokenize, a prompt is assumed to cost one token per UTF-8
# byte: an upper bound for byte-level BPE tokenizers (GPT, Llama 3, SmolLM2), so the first
# reservations err on the safe side; the ratio is then learned from the answers.
INITIAL_TOKENS_PER_BYTE = 1.0
# Chat templates add a few tokens per message (role markers) that the text does not show.
TOKENS_PER_MESSAGE = 8


def token_limit(options: BackendOptions) -> tuple[int | None, str | None]:
    """The tightest token limit the flags set, and the flag that set it."""
    limits = []
    if options.max_tokens_total is not None:
        limits.append((options.max_tokens_total, "max_tokens_total"))
    if options.budget is not None and options.price_per_1k:
        limits.append((int(options.budget / options.price_per_1k * TOKENS_PER_1K), "budget"))
    if not limits:
        return None, None
    return min(limits)


def prompt_bytes(request: Request) -> tuple[int, int]:
    """(UTF-8 bytes, messages) of what the request sends as its prompt."""
    if request.messages:
        return sum(len(str(m.get("content", "")).encode()) for m in request.messages), len(request.messages)
    return len((request.prompt or "").encode()), 0


class LimitedClient:
    """Wraps `inner` (same `stream` API): stops before a spending limit, and on a dead server."""

    def __init__(self, inner: LLMClient, options: BackendOptions, *, owns_inner: bool = True):
        self.inner = inner
        self.options = options
        self.owns_inner = owns_inner
        self.backend = inner.backend
        self.model = inner.model
        self.base_url = getattr(inner, "base_url", None) or options.shown_url
        self.limit, self.limit_name = token_limit(options)
        self.spent = 0  # tokens of answers sent to the backend (not cache hits)
        self.stopped: str | None = None  # "max_tokens_total" or "budget" once a limit ended a stream
        self._reserved: dict[int, tuple[Request, int]] = {}  # id(request) -> (request, tokens)
        self._tokens_per_byte = INITIAL_TOKENS_PER_BYTE
        self._first: list[Response] = []  # the first answers from the backend, until one succeeds

    @property
    def totals(self) -> Totals:
        return self.inner.totals

    def close(self) -> None:
        if self.owns_inner:
            self.inner.close()

    # ------------------------------------------------------------ spending

    def _estimate(self, request: Request) -> int:
        size, messages = prompt_bytes(request)
        return request.max_tokens * request.n + int(size * self._tokens_per_byte) + TOKENS_PER_MESSAGE * messages

    def _has_room(self) -> bool:
        if self.limit is None:
            return True
        return self.spent + sum(tokens for _, tokens in self._reserved.values()) < self.limit

    def _gate(self, source: Iterator[Request], state: dict) -> Iterator[Request]:
        # Pulled by the inner client only when it is about to send: the check comes first, so a
        # stage's request (which may have side effects) is never built and then held back.
        while True:
            if not self._has_room():
                if self.spent >= self.limit:
                    self.stopped = self.limit_name
                # else: requests in flight hold the rest; pause until their answers settle it
                return
            request = next(source, None)
            if request is None:
                state["ended"] = True
                return
            if self.limit is not None:
                self._reserved[id(request)] = (request, self._estimate(request))
            yield request

    def _settle(self, response: Response) -> None:
        self._reserved.pop(id(response.request), None)
        if response.cached:
            return
        self.spent += response.prompt_tokens + response.completion_tokens
        size, _ = prompt_bytes(response.request)
        if response.prompt_tokens and size:
            # The worst ratio seen: estimates stay upper bounds for prompts of the same kind.
            learned = response.prompt_tokens / size
            if self._tokens_per_byte == INITIAL_TOKENS_PER_BYTE or learned > self._tokens_per_byte:
                self._tokens_per_byte = learned

    # ------------------------------------------------------------ a dead server

    def _check_first(self, response: Response) -> None:
        if response.cached or self._first is None:
            return
        if response.error is None:
            self._first = None  # the server works; from here on a failure is one request's problem
            return
        self._first.append(response)
        failed = [r for r in self._first if not r.rejected]
        enough = FIRST_REQUESTS_CHECKED if not failed else min(FIRST_REQUESTS_CHECKED, self.options.concurrency)
        if len(self._first) < enough:
            return
        first = (failed or self._first)[0]
        what = "failed after their retries" if failed else "were rejected"
        raise UserError(f"{first.error} (the first {len(self._first)} requests all {what})")

    # ------------------------------------------------------------ the stream

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]:
        self.stopped = None
        source = iter(requests)
        try:
            while True:
                state = {"ended": False}
                for response in self.inner.stream(self._gate(source, state)):
                    self._settle(response)
                    self._check_first(response)
                    yield response
                # Paused near a limit: every reservation is settled now, so the next round sees
                # what was really spent and lets at least one more request through, or stops.
                self._reserved.clear()
                if state["ended"] or self.stopped:
                    return
        finally:
            self._reserved.clear()  # abandoned requests: the inner client counts them
