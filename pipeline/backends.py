"""LLM backends behind one small interface: `openai` (any OpenAI-compatible server) and `local`.

Every stage that talks to a model opens its client here, from its config (which *is* a
`BackendOptions`: stage configs inherit these fields, so the flags are declared once):

    client = open_client(cfg)                        # or open_client(cfg, client=fake) in tests
    for response in client.stream(requests):         # requests: any iterable, pulled lazily
        ...                                          # responses arrive in completion order
    client.totals                                    # sent, answered, retries, failures, tokens
    client.stopped                                   # None, or the spending limit that ended the stream
    client.close()

`open_client` stacks, from the outside in: the spending limit and the first-requests check
(`pipeline.limits`), the request cache (`pipeline.cache`, unless `--no-cache`), and the backend
(with `--batch-api`, `pipeline.batch_api.BatchClient`: the same stream, answered through the Batch API).
`stream` pulls a new request only when a slot is free (at most `concurrency` in flight), so a
stage like `generate` can build each prompt from the pool as it is at that moment. Breaking out
of the loop (closing the generator) cancels what is in flight; those count as abandoned.

What a request can end as:
- answered: `texts` set;
- rejected: the server refused this one request (400/422: context too long, a content
  filter): `error` set and `rejected` true; retrying it cannot help, other requests may pass;
- failed: 429/5xx/timeouts/dropped connections/malformed bodies outlasted the retries:
  `error` set; a rerun may succeed;
- fatal: 401/403/404 mean every request fails the same way, so `stream` raises UserError
  with one line that says what to fix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import threading
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Iterator, Literal, Protocol

from pipeline.config import option, validate
from pipeline.errors import UserError
from pipeline.urls import REDACTED, redact_url, redact_urls, url_secrets


@dataclass(frozen=True)
class Request:
    key: str  # the caller's id for this request; echoed in the Response
    messages: tuple[dict, ...] | None = None  # chat form: ({"role": "user", "content": ...}, ...)
    prompt: str | None = None  # raw completion form (base models)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] | None = None
    n: int = 1
    seed: int | None = None
    # Next-token probabilities (the judge's G-Eval scores): > 0 asks for the first answer token's
    # k most likely alternatives in Response.top_logprobs (openai: `logprobs`/`top_logprobs`).
    top_logprobs: int = 0
    # Tokens whose log-probabilities the local backend adds to those alternatives: it has the
    # whole distribution, so a digit the model finds unlikely still gets its probability.
    logprob_tokens: tuple[str, ...] = ()
    # openai chat: the `response_format` object as JSON text (text keeps the frozen Request hashable).
    response_format: str | None = None


@dataclass
class Response:
    request: Request
    texts: list[str] = field(default_factory=list)  # one per choice (n)
    finish_reasons: list[str] = field(default_factory=list)  # "stop", "length", "content_filter", ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_id: str | None = None  # the server's id, for provenance
    model: str = ""
    backend: str = ""
    cached: bool = False
    error: str | None = None  # set when the request failed after all retries, or was rejected
    rejected: bool = False  # the server refused this request (400/422): asking again cannot help
    retries: int = 0  # how many times this request was retried before this answer
    top_logprobs: list[dict[str, float]] = field(default_factory=list)  # per choice: first token's {token: logprob}
    # How the local backend ran the model, for provenance ("torch-2.13 continuous-batching", "bf16");
    # empty for a server, which does not say.
    engine: str = ""
    precision: str = ""


@dataclass
class Totals:
    """What a client did. Every request sent is one of answered, failed, rejected or abandoned."""

    requests: int = 0  # responses returned (cached ones included)
    retries: int = 0  # retries that happened (429, 5xx, timeouts, malformed bodies)
    failures: int = 0  # failed after all retries
    rejected: int = 0  # refused by the server (400/422)
    cached: int = 0  # answered from the request cache: nothing sent
    abandoned: int = 0  # sent, then cancelled before the answer came (the stage had what it needed)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, response: Response) -> None:
        self.requests += 1
        self.retries += response.retries
        self.failures += response.error is not None and not response.rejected
        self.rejected += response.rejected
        self.cached += response.cached
        self.prompt_tokens += response.prompt_tokens
        self.completion_tokens += response.completion_tokens

    @property
    def sent(self) -> int:
        """Requests that reached (or were on their way to) the backend: all but cache hits."""
        return self.requests - self.cached + self.abandoned

    @property
    def answered(self) -> int:
        return self.requests - self.cached - self.failures - self.rejected


class LLMClient(Protocol):
    backend: str
    model: str
    totals: Totals

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]: ...

    def close(self) -> None: ...


Api = Literal["chat", "completions"]
Backend = Literal["local", "openai"]

# Placeholder key for local servers (vLLM, llama.cpp, Ollama) that ignore it; the SDK refuses no key.
NO_KEY = "not-needed"
# Base of the exponential backoff for the retries this module adds (malformed bodies); the
# SDK's own retries (429, 5xx, timeouts, dropped connections) use its schedule, 0.5 s doubling.
DEFAULT_RETRY_BASE_DELAY = 0.5
# Backoff never waits longer than this between two tries of one request.
MAX_RETRY_DELAY = 8.0
# The most alternatives per token OpenAI's legacy completions endpoint returns (`logprobs`).
COMPLETIONS_MAX_LOGPROBS = 5
# Error text from a server is cut here so one failure stays one line.
MAX_ERROR_CHARS = 300
# Loggers that see requests to the server; the key is scrubbed from anything they log.
HTTP_LOGGER_PREFIXES = ("openai", "httpx", "httpx2", "httpcore", "httpcore2")
# The header in which the SDK numbers each try of a request (0 = the first); read back from
# an exception to count the retries that really happened before the SDK gave up.
RETRY_COUNT_HEADER = "x-stainless-retry-count"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_CACHE_DIR = "data/cache"
# --batch-api: the first wait between two polls of a submitted batch; it doubles up to
# pipeline.batch_api.MAX_POLL_SECONDS (a batch takes minutes to hours; polling faster buys nothing).
DEFAULT_BATCH_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class BackendOptions:
    """How a stage reaches its model: every stage config that talks to one inherits these fields."""

    backend: Backend = option("local", "local: the embedded model (or --model folder) in-process; "
                                       "openai: any OpenAI-compatible server")
    model: str = option(DEFAULT_MODEL, "model name (openai) or local model folder; the default is embedded")
    base_url: str | None = option(None, "OpenAI-compatible server URL (default: $OPENAI_BASE_URL)")
    api: Api = option("chat", "chat for instruct models, completions for base models")
    concurrency: int = option(16, "requests in flight (openai); with --batch-api, requests per submitted batch", min=1)
    timeout: float = option(60.0, "seconds per request before it is retried (openai)", above=0)
    max_retries: int = option(5, "retries of a failed request before it is given up (openai)", min=0)
    batch_size: int = option(16, "sequences generated together (local; continuous batching)", min=1)
    device: str = option("auto", "auto, cpu, cuda, mps (local)")
    seed: int | None = option(42, "sampling seed")
    cache: bool = option(True, "replay answers already in --cache-dir instead of asking again")
    cache_dir: str = option(DEFAULT_CACHE_DIR, "request cache folder")
    max_tokens_total: int | None = option(None, "stop cleanly before spending more than this many tokens "
                                                "(prompt + completion; overshoot at most one request)", min=1)
    price_per_1k: float | None = option(None, "dollars per 1,000 tokens, for --budget", min=0)
    budget: float | None = option(None, "stop cleanly before spending more than this many dollars "
                                        "(needs --price-per-1k)", above=0)
    batch_api: bool = option(False, "openai: send the requests through the Batch API (/v1/files, /v1/batches; "
                                    "half the price on OpenAI, slower), --concurrency of them per batch; "
                                    "a killed run picks its batch up again")
    # Tests shorten the backoff of the retries this module adds; not a flag.
    retry_base_delay: float = option(DEFAULT_RETRY_BASE_DELAY, "backoff base (s)", hidden=True, min=0)
    # Tests poll their fake server's batches faster; not a flag.
    batch_poll_interval: float = option(DEFAULT_BATCH_POLL_SECONDS, "first wait between batch polls (s)",
                                        hidden=True, above=0)

    def __post_init__(self):
        validate(self)  # bounds and choices (Literal types too) from the field metadata, a subclass's fields too
        if self.budget is not None and self.price_per_1k is None:
            raise UserError("--budget: needs --price-per-1k to turn tokens into dollars")
        if self.batch_api and self.backend != "openai":
            raise UserError(f"--batch-api: needs --backend openai (the {self.backend} backend has no batch to submit)")

    @classmethod
    def of(cls, cfg: "BackendOptions", **changes) -> "BackendOptions":
        """The backend part of a stage config, with `changes` (e.g. a judge's own model and URL)."""
        values = {f.name: getattr(cfg, f.name) for f in fields(BackendOptions)}
        return BackendOptions(**{**values, **changes})

    @property
    def shown_url(self) -> str:
        """The server URL as it may be shown: given or from the environment, credentials redacted."""
        return redact_url(self.base_url or os.environ.get("OPENAI_BASE_URL") or "")


def make_client(options: BackendOptions) -> LLMClient:
    """The bare backend (no cache, no limits); stages use `open_client`."""
    if options.backend == "openai" and options.batch_api:
        from pipeline.batch_api import BatchClient, state_path_for

        # A stage config has --out: the batch state goes beside it, so a rerun finds it.
        return BatchClient(options, state_path_for(getattr(options, "out", None)))
    if options.backend == "openai":
        return OpenAIClient(options)
    from pipeline.local_backend import LocalClient  # imports torch: only when the local backend is used

    return LocalClient(options)


def open_client(options: BackendOptions, client: LLMClient | None = None) -> LLMClient:
    """The client a stage talks to: `client` (a test's fake) or a new backend from `options`,
    behind the request cache (when `options.cache`) and the spending limits.

    An unusable `--cache-dir` fails here, before a model is loaded or a request is paid for.
    Closing the result closes a backend made here, never a `client` passed in.
    """
    from pipeline.cache import CachedClient, check_cache_dir
    from pipeline.limits import LimitedClient

    if options.cache:
        check_cache_dir(options.cache_dir)
    owned = client is None
    inner = make_client(options) if owned else client
    if options.cache:
        inner = CachedClient(inner, options.cache_dir, base_url=_cache_url(options, inner))
    return LimitedClient(inner, options, owns_inner=owned)


def _cache_url(options: BackendOptions, client: LLMClient) -> str:
    # The server is part of what an answer means: another server never replays this one's answers.
    # Credentials are not (rotating a key keeps the cache); a local model has no server.
    return redact_url(getattr(client, "base_url", None) or "") if options.backend == "openai" else ""


def backoff_delay(retry: int, base: float) -> float:
    """Exponential backoff with jitter (full range 75-100%, as the SDK does) for the `retry`-th retry."""
    return min(base * 2 ** retry, MAX_RETRY_DELAY) * (1 - 0.25 * random.random())


def chat_messages(request: Request) -> list[dict]:
    if request.messages:
        return [dict(m) for m in request.messages]
    if request.prompt is not None:
        return [{"role": "user", "content": request.prompt}]
    raise ValueError(f"request {request.key!r} has neither messages nor prompt")


def completion_prompt(request: Request) -> str:
    """The raw prompt for the completions API; a chat request is accepted only as one user turn."""
    if request.prompt is not None:
        return request.prompt
    messages = request.messages or ()
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0]["content"])
    raise UserError("--api completions: this stage sends multi-turn chat messages, which the completions "
                    "endpoint cannot take; use --api chat")


# ---------------------------------------------------------------- openai


class _RedactSecret(logging.Filter):
    """Replaces the API key (and URL credentials) in any log record, whatever level is enabled."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, REDACTED), None
        return True


def _guard_secrets_in_logs(secrets: list[str]) -> None:
    # A logger's filters see only records created on that exact logger, not on its children,
    # so the filter goes on every HTTP-side logger that exists once the SDK is imported.
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] in HTTP_LOGGER_PREFIXES]
    for secret in secrets:
        if not secret or secret == NO_KEY:
            continue
        for name in set(names) | set(HTTP_LOGGER_PREFIXES):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _RedactSecret) and f.secret == secret for f in logger.filters):
                logger.addFilter(_RedactSecret(secret))


class _Malformed(Exception):
    """A 200 answer whose body is not a completion; the SDK does not retry these, so we do."""


def _retries_taken(e: Exception) -> int:
    """How many retries the SDK made before raising `e` (0 when it made none, as for 402/413)."""
    request = getattr(e, "request", None)
    try:
        return int(request.headers.get(RETRY_COUNT_HEADER, 0)) if request is not None else 0
    except (AttributeError, ValueError):
        return 0


class OpenAIClient:
    """Any OpenAI-compatible server through `openai.AsyncOpenAI`, driven from a plain iterator.

    The asyncio loop runs in a background thread, so `stream` is an ordinary generator that
    stages may break out of. Retries: the SDK's own (429 honouring Retry-After, 408/409, 5xx,
    timeouts, dropped connections; exponential backoff with jitter), plus retries of malformed
    200 bodies, which the SDK does not retry, all from one `max_retries` budget per request and
    counted as they happened (read back from the SDK's retry-count header, on success and on
    failure alike).
    """

    backend = "openai"

    def __init__(self, options: BackendOptions):
        import openai

        self.options = options
        self.model = options.model
        self.api = options.api
        self.totals = Totals()
        self._key = os.environ.get("OPENAI_API_KEY") or NO_KEY
        url = options.base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._secrets = [s for s in [self._key, *url_secrets(url)] if s and s != NO_KEY]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-client", daemon=True)
        self._thread.start()

        async def build():
            return openai.AsyncOpenAI(base_url=url, api_key=self._key, max_retries=options.max_retries,
                                      timeout=options.timeout)

        try:
            self._client = asyncio.run_coroutine_threadsafe(build(), self._loop).result()
        except (ValueError, TypeError, openai.OpenAIError) as e:  # an unparseable URL, say
            self._stop_loop()
            raise UserError(f"--base-url {redact_url(url or '')}: {self._scrub(str(e))}") from None
        self.base_url = redact_url(str(self._client.base_url).rstrip("/"))  # only ever shown
        self._by_budget: dict[int, Any] = {options.max_retries: self._client}
        _guard_secrets_in_logs(self._secrets)

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]:
        source = iter(requests)
        in_flight: set[concurrent.futures.Future] = set()
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) < self.options.concurrency:
                    request = next(source, None)
                    if request is None:
                        exhausted = True
                        break
                    in_flight.add(asyncio.run_coroutine_threadsafe(self._answer(request), self._loop))
                if not in_flight:
                    return
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    in_flight.discard(future)
                    response = future.result()  # only UserError escapes _answer
                    self.totals.add(response)
                    yield response
        finally:
            # Sent and never handed to the caller: the server may have done (and billed) the work.
            self.totals.abandoned += len(in_flight)
            for future in in_flight:
                future.cancel()

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown():
            # Requests still in flight (Ctrl-C, an error) are cancelled and awaited: a task left
            # pending when the loop closes prints "Task was destroyed but it is pending!".
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._client.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result()
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _sdk(self, budget: int):
        # One SDK client per retry budget left (the SDK's public way to set max_retries);
        # copies share the connection pool.
        if budget not in self._by_budget:
            self._by_budget[budget] = self._client.with_options(max_retries=budget)
        return self._by_budget[budget]

    async def _answer(self, request: Request) -> Response:
        import openai

        retries = 0
        while True:
            budget = self.options.max_retries - retries  # never negative: see the two increments below
            try:
                raw = await self._send(self._sdk(budget), request)
                retries += raw.retries_taken
                return self._response(request, raw.parse(), retries)
            except (openai.APIConnectionError, openai.APIStatusError) as e:  # APITimeoutError is a connection error
                self._raise_if_fatal(e)
                retries += _retries_taken(e)  # the SDK stopped: budget spent, or not retryable (402, 413)
                if isinstance(e, (openai.BadRequestError, openai.UnprocessableEntityError)):
                    return self._failure(request, retries, self._rejection(e), rejected=True)
                return self._failure(request, retries, self._describe(e))
            except _Malformed as e:
                if retries >= self.options.max_retries:
                    return self._failure(request, retries, f"malformed response from {self.base_url}: {e}")
                await asyncio.sleep(backoff_delay(retries, self.options.retry_base_delay))
                retries += 1

    async def _send(self, sdk, request: Request):
        params = self.request_body(request)
        if self.api == "chat":
            raw = await sdk.chat.completions.with_raw_response.create(**params)
        else:
            raw = await sdk.completions.with_raw_response.create(**params)
        return _CheckedRaw(raw)

    def request_body(self, request: Request) -> dict[str, Any]:
        """The JSON body of `request` for this client's endpoint (live, or one line of a batch file)."""
        params: dict[str, Any] = {"model": self.model, "temperature": request.temperature, "top_p": request.top_p,
                                  "max_tokens": request.max_tokens, "n": request.n}
        if request.stop:
            params["stop"] = list(request.stop)
        seed = request.seed if request.seed is not None else self.options.seed
        if seed is not None:
            params["seed"] = seed
        if self.api == "chat":
            if request.top_logprobs:
                params.update(logprobs=True, top_logprobs=request.top_logprobs)
            if request.response_format:
                params["response_format"] = json.loads(request.response_format)
            params["messages"] = chat_messages(request)
        else:
            if request.top_logprobs:
                # The legacy endpoint takes the count here, and OpenAI's allows at most 5.
                params["logprobs"] = min(request.top_logprobs, COMPLETIONS_MAX_LOGPROBS)
            params["prompt"] = completion_prompt(request)
        return params

    def _response(self, request: Request, parsed, retries: int) -> Response:
        choices = sorted(parsed.choices, key=lambda c: c.index or 0)
        if self.api == "chat":
            texts = [(c.message.content if c.message else None) or "" for c in choices]
        else:
            texts = [c.text or "" for c in choices]
        usage = parsed.usage
        return Response(request=request, texts=texts, finish_reasons=[c.finish_reason or "" for c in choices],
                        prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
                        completion_tokens=(usage.completion_tokens or 0) if usage else 0,
                        request_id=parsed.id, model=parsed.model or self.model, backend=self.backend,
                        retries=retries, top_logprobs=[self._first_token_alternatives(c) for c in choices]
                        if request.top_logprobs else [])

    def _first_token_alternatives(self, choice) -> dict[str, float]:
        """{token: logprob} of the first generated token; {} when the server sent none."""
        logprobs = getattr(choice, "logprobs", None)
        if logprobs is None:
            return {}
        if self.api == "chat":
            content = getattr(logprobs, "content", None) or []
            return {alt.token: alt.logprob for alt in (content[0].top_logprobs or [])} if content else {}
        top = getattr(logprobs, "top_logprobs", None) or []
        return dict(top[0]) if top and top[0] else {}

    def _failure(self, request: Request, retries: int, error: str, rejected: bool = False) -> Response:
        return Response(request=request, model=self.model, backend=self.backend, retries=retries,
                        error=self._scrub(error), rejected=rejected)

    def _raise_if_fatal(self, e: Exception) -> None:
        """401/403/404 mean every later request fails the same way: stop the stage."""
        import openai

        at = f"at {self.base_url}"
        if isinstance(e, openai.AuthenticationError):
            raise UserError(f"authentication failed {at}: check OPENAI_API_KEY") from None
        if isinstance(e, openai.PermissionDeniedError):
            raise UserError(f"permission denied {at}: check OPENAI_API_KEY and access to model {self.model!r}") from None
        if isinstance(e, openai.NotFoundError):
            endpoint = "chat/completions" if self.api == "chat" else "completions"
            raise UserError(f"not found {at}/{endpoint}: check --model {self.model!r}, --api {self.api} "
                            f"and --base-url") from None

    def _rejection(self, e) -> str:
        return f"request rejected at {self.base_url} ({e.status_code}): {self._server_message(e)}"

    def _describe(self, e: Exception) -> str:
        """One line naming the server and what really went wrong."""
        import openai

        if isinstance(e, openai.APITimeoutError):
            return f"timed out after {self.options.timeout:g} s waiting for {self.base_url}"
        if isinstance(e, openai.APIConnectionError):
            return f"cannot connect to {self.base_url}: {_connection_reason(e)}"
        if isinstance(e, openai.APIStatusError):
            return f"HTTP {e.status_code} from {self.base_url}: {self._server_message(e)}"
        return str(e)

    def _server_message(self, e) -> str:
        body = e.body
        message = body.get("message") if isinstance(body, dict) else None
        return self._scrub(" ".join(str(message or e.message).split())[:MAX_ERROR_CHARS])

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return redact_urls(text)


def _connection_reason(e: Exception) -> str:
    """The innermost cause of a connection error, as plain words: 'connection refused'."""
    cause: BaseException = e
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and (cause.errno or cause.strerror):
        # asyncio words a refused connection "Connect call failed (...)"; the errno says what it was.
        words = os.strerror(cause.errno) if cause.errno else cause.strerror
        return words[:1].lower() + words[1:]
    text = " ".join(str(cause).split()) or type(cause).__name__
    text = text.split("] ", 1)[-1] if text.startswith("[Errno") else text  # "[Errno 111] Connection refused"
    return (text[:1].lower() + text[1:])[:MAX_ERROR_CHARS]


class _CheckedRaw:
    """A raw SDK response whose `parse()` turns an unusable 200 body into `_Malformed`."""

    def __init__(self, raw):
        self.raw = raw
        self.retries_taken = raw.retries_taken

    def parse(self):
        try:
            parsed = self.raw.parse()
        except Exception as e:  # the SDK raises JSON and validation errors of several types here
            raise _Malformed(f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]) from None
        if isinstance(parsed, (str, bytes)) or not isinstance(getattr(parsed, "choices", None), list) \
                or not parsed.choices:
            raise _Malformed("no choices in the response body")
        return parsed
