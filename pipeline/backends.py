"""LLM backends behind one small interface: `openai` (any OpenAI-compatible server) and `local`.

Stages never run this module; they build a client from their flags and stream requests:

    client = make_client(backend_options_from(cfg))  # or a fake in tests
    for response in client.stream(requests):         # requests: any iterable, pulled lazily
        ...                                          # responses arrive in completion order
    client.totals                                    # requests, retries, failures, tokens
    client.close()

`stream` pulls a new request from the iterable only when a slot is free (at most
`concurrency` in flight), so a stage like `generate` can build each prompt from the pool as it
is at that moment. Breaking out of the loop (closing the generator) cancels what is in flight.
A request that fails for good yields a Response with `error` set; it never raises, except
for errors that no retry can fix (401/403/404/400 -> UserError with one clear line).

The backend flags every generating stage carries (same names as `BackendOptions`):
--backend, --model, --base-url, --api, --concurrency, --timeout, --max-retries, --seed,
--batch-size, --device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Protocol

from pipeline.config import option
from pipeline.errors import UserError


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
    error: str | None = None  # set when the request failed after all retries
    retries: int = 0  # how many times this request was retried before this answer


@dataclass
class Totals:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, response: Response) -> None:
        self.requests += 1
        self.retries += response.retries
        self.failures += response.error is not None
        self.cached += response.cached
        self.prompt_tokens += response.prompt_tokens
        self.completion_tokens += response.completion_tokens

    def summary(self) -> str:
        return (f"{self.requests} requests ({self.cached} cached, {self.retries} retries, "
                f"{self.failures} failed), {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens")


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
# Error text from a server is cut here so one failure stays one line.
MAX_ERROR_CHARS = 300
# The local backend sorts this many batches' worth of pulled requests by length, so padding
# stays small without pulling far ahead of a stage that builds prompts from its current state.
SORT_WINDOW_BATCHES = 4
# Loggers that see requests to the server; the key is scrubbed from anything they log.
HTTP_LOGGER_PREFIXES = ("openai", "httpx", "httpx2", "httpcore")


@dataclass(frozen=True)
class BackendOptions:
    backend: Backend = "local"
    model: str = "SmolLM2-135M-Instruct"
    base_url: str | None = None  # openai: None -> $OPENAI_BASE_URL, else the SDK's default
    api: Api = "chat"
    concurrency: int = 16
    timeout: float = 60.0
    max_retries: int = 5
    seed: int | None = 42
    batch_size: int = 16
    device: str = "auto"
    retry_base_delay: float = DEFAULT_RETRY_BASE_DELAY

    def __post_init__(self):
        if self.backend not in ("local", "openai"):
            raise UserError(f"--backend: {self.backend!r} is not one of local, openai")
        if self.api not in ("chat", "completions"):
            raise UserError(f"--api: {self.api!r} is not one of chat, completions")
        if self.concurrency < 1:
            raise UserError(f"--concurrency: must be at least 1, got {self.concurrency}")
        if not self.timeout > 0:
            raise UserError(f"--timeout: must be more than 0 seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise UserError(f"--max-retries: must be 0 or more, got {self.max_retries}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size: must be at least 1, got {self.batch_size}")
        if self.retry_base_delay < 0:
            raise UserError(f"--retry-base-delay: must be 0 or more, got {self.retry_base_delay}")


@dataclass(frozen=True)
class BackendFlags:
    """The backend flags that `generate` and `respond` share: their Configs inherit these fields."""

    backend: Literal["local", "openai"] = option("local", "local: the embedded model (or --model folder) in-process; "
                                                 "openai: any OpenAI-compatible server")
    model: str = option("SmolLM2-135M-Instruct", "model name (openai) or local model folder; the default is embedded")
    base_url: str | None = option(None, "OpenAI-compatible server URL (default: $OPENAI_BASE_URL)")
    api: Literal["chat", "completions"] = option("chat", "chat for instruct models, completions for base models")
    concurrency: int = option(16, "requests in flight (openai)")
    timeout: float = option(60.0, "seconds per request before it is retried (openai)")
    max_retries: int = option(5, "retries of a failed request before it is given up (openai)")
    batch_size: int = option(16, "prompts per generate() call (local)")
    device: str = option("auto", "auto, cpu, cuda, mps (local)")


def backend_options_from(cfg: Any) -> BackendOptions:
    """BackendOptions from a stage config whose flat fields share BackendOptions' names.

    Fields the config lacks keep BackendOptions' defaults.
    """
    names = BackendOptions.__dataclass_fields__
    return BackendOptions(**{name: getattr(cfg, name) for name in names if hasattr(cfg, name)})


def make_client(options: BackendOptions) -> LLMClient:
    if options.backend == "openai":
        return OpenAIClient(options)
    return LocalClient(options)


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
    """Replaces the API key in any log record with a placeholder, whatever level is enabled."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "[redacted]"), None
        return True


def _guard_key_in_logs(secret: str) -> None:
    # A logger's filters see only records created on that exact logger, not on its children,
    # so the filter goes on every HTTP-side logger that exists once the SDK is imported.
    if not secret or secret == NO_KEY:
        return
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] in HTTP_LOGGER_PREFIXES]
    for name in set(names) | set(HTTP_LOGGER_PREFIXES):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactSecret) and f.secret == secret for f in logger.filters):
            logger.addFilter(_RedactSecret(secret))


class _Malformed(Exception):
    """A 200 answer whose body is not a completion; the SDK does not retry these, so we do."""


class OpenAIClient:
    """Any OpenAI-compatible server through `openai.AsyncOpenAI`, driven from a plain iterator.

    The asyncio loop runs in a background thread, so `stream` is an ordinary generator that
    stages may break out of. Retries: the SDK's own (429 honouring Retry-After, 408/409, 5xx,
    timeouts, dropped connections; exponential backoff with jitter), counted per request from
    the raw response; plus retries of malformed 200 bodies, which the SDK does not retry, from
    the same `max_retries` budget.
    """

    backend = "openai"

    def __init__(self, options: BackendOptions):
        import openai

        self.options = options
        self.model = options.model
        self.api = options.api
        self.totals = Totals()
        self._key = os.environ.get("OPENAI_API_KEY") or NO_KEY
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-client", daemon=True)
        self._thread.start()

        async def build():
            return openai.AsyncOpenAI(base_url=options.base_url or os.environ.get("OPENAI_BASE_URL") or None,
                                      api_key=self._key, max_retries=options.max_retries, timeout=options.timeout)

        self._client = asyncio.run_coroutine_threadsafe(build(), self._loop).result()
        self.base_url = str(self._client.base_url).rstrip("/")
        self._by_budget: dict[int, Any] = {options.max_retries: self._client}
        _guard_key_in_logs(self._key)

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
                done, in_flight = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    response = future.result()  # only UserError escapes _answer
                    self.totals.add(response)
                    yield response
        finally:
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
            budget = self.options.max_retries - retries
            try:
                raw = await self._send(self._sdk(budget), request)
                retries += raw.retries_taken
                return self._response(request, raw.parse(), retries)
            except (openai.APIConnectionError, openai.APIStatusError) as e:  # APITimeoutError is a connection error
                self._raise_if_fatal(e)
                # The SDK gave up after spending the whole budget on retries.
                return self._failure(request, retries + budget, self._describe(e))
            except _Malformed as e:
                if budget == 0:
                    return self._failure(request, retries, f"malformed response: {e}")
                await asyncio.sleep(backoff_delay(retries, self.options.retry_base_delay))
                retries += 1

    async def _send(self, sdk, request: Request):
        params: dict[str, Any] = {"model": self.model, "temperature": request.temperature, "top_p": request.top_p,
                                  "max_tokens": request.max_tokens, "n": request.n}
        if request.stop:
            params["stop"] = list(request.stop)
        seed = request.seed if request.seed is not None else self.options.seed
        if seed is not None:
            params["seed"] = seed
        if self.api == "chat":
            raw = await sdk.chat.completions.with_raw_response.create(messages=chat_messages(request), **params)
        else:
            raw = await sdk.completions.with_raw_response.create(prompt=completion_prompt(request), **params)
        return _CheckedRaw(raw)

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
                        retries=retries)

    def _failure(self, request: Request, retries: int, error: str) -> Response:
        return Response(request=request, model=self.model, backend=self.backend, retries=retries,
                        error=self._scrub(error))

    def _raise_if_fatal(self, e: Exception) -> None:
        """401/403/404/400 (and 422) mean every later request fails the same way: stop the stage."""
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
        if isinstance(e, (openai.BadRequestError, openai.UnprocessableEntityError)):
            raise UserError(f"request rejected {at} ({e.status_code}): {self._server_message(e)}") from None

    def _describe(self, e: Exception) -> str:
        import openai

        if isinstance(e, openai.APITimeoutError):
            return f"timed out after {self.options.timeout:g} s"
        if isinstance(e, openai.APIConnectionError):
            return f"connection failed: {e.__cause__ or e}"
        if isinstance(e, openai.APIStatusError):
            return f"HTTP {e.status_code}: {self._server_message(e)}"
        return str(e)

    def _server_message(self, e) -> str:
        body = e.body
        message = body.get("message") if isinstance(body, dict) else None
        return self._scrub(" ".join(str(message or e.message).split())[:MAX_ERROR_CHARS])

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key != NO_KEY else text


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


# ---------------------------------------------------------------- local


class LocalClient:
    """`transformers` in-process: batched generation with left padding, requests sorted by length.

    Requests are pulled `batch_size * SORT_WINDOW_BATCHES` at a time, grouped by sampling
    parameters (one `generate` call takes one set), sorted by prompt length and generated in
    batches. With a seed, batch i is sampled after `torch.manual_seed(seed + i)`, so the same
    requests in the same order give the same texts.
    """

    backend = "local"

    def __init__(self, options: BackendOptions):
        from pipeline.models import load_model, load_tokenizer

        self.options = options
        self.model = options.model
        self.api = options.api
        self.totals = Totals()
        self.tokenizer = load_tokenizer(options.model, padding_side="left")
        self.lm = load_model(options.model, device=options.device)
        eos = self.lm.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # generate() right-pads rows that ended early with the pad token, so it marks an end too.
        self._eos |= {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        self._batches_done = 0

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]:
        source = iter(requests)
        window_size = self.options.batch_size * SORT_WINDOW_BATCHES
        while True:
            window = [r for _, r in zip(range(window_size), source)]
            if not window:
                return
            for batch in self._batches(window):
                for response in self._generate(batch):
                    self.totals.add(response)
                    yield response

    def close(self) -> None:
        self.lm = None

    def _render(self, request: Request) -> tuple[str, bool]:
        """The text to generate from, and whether it already holds the special tokens."""
        if request.messages and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
            return text, True
        if request.prompt is not None:
            return request.prompt, False
        return "\n\n".join(str(m["content"]) for m in chat_messages(request)), False

    def _batches(self, window: list[Request]) -> list[list[tuple[Request, str, bool]]]:
        groups: dict[tuple, list] = {}
        for request in window:
            text, templated = self._render(request)
            key = (request.temperature, request.top_p, request.max_tokens, request.stop, request.n, templated)
            groups.setdefault(key, []).append((request, text, templated))
        batches = []
        size = self.options.batch_size
        for items in groups.values():
            items.sort(key=lambda item: len(item[1]))
            batches += [items[i:i + size] for i in range(0, len(items), size)]
        return batches

    def _generate(self, batch: list[tuple[Request, str, bool]]) -> list[Response]:
        import torch

        first = batch[0][0]
        templated = batch[0][2]
        encoded = self.tokenizer([text for _, text, _ in batch], return_tensors="pt", padding=True,
                                 add_special_tokens=not templated).to(self.lm.device)
        kwargs: dict[str, Any] = {"max_new_tokens": first.max_tokens, "num_return_sequences": first.n,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        prompt_len = encoded["input_ids"].shape[1]
        if first.stop:
            kwargs["stopping_criteria"] = _stop_in_completion(self.tokenizer, first.stop, prompt_len)
        seed = first.seed if first.seed is not None else self.options.seed
        if seed is not None:
            torch.manual_seed(seed + self._batches_done)
        self._batches_done += 1
        with torch.inference_mode():
            output = self.lm.generate(**encoded, **kwargs)
        prompt_tokens = encoded["attention_mask"].sum(dim=1).tolist()
        responses = []
        for i, (request, _, _) in enumerate(batch):
            texts, reasons, used = [], [], 0
            for row in output[i * request.n:(i + 1) * request.n, prompt_len:].tolist():
                text, reason, count = self._finish(row, request)
                texts.append(text)
                reasons.append(reason)
                used += count
            responses.append(Response(request=request, texts=texts, finish_reasons=reasons,
                                      prompt_tokens=int(prompt_tokens[i]), completion_tokens=used,
                                      request_id=f"local-{request.key}", model=self.model, backend=self.backend))
        return responses

    def _finish(self, tokens: list[int], request: Request) -> tuple[str, str, int]:
        """Text, finish_reason and token count of one generated row (right-padded after it ended)."""
        end = next((i for i, t in enumerate(tokens) if t in self._eos), None)
        kept = tokens if end is None else tokens[:end]
        count = len(tokens) if end is None else end + 1
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cuts = [text.find(s) for s in request.stop or () if s and s in text]
        if cuts:
            return text[:min(cuts)], "stop", count
        if end is None and count >= request.max_tokens:
            return text, "length", count
        return text, "stop", count


def _stop_in_completion(tokenizer, stops: tuple[str, ...], prompt_len: int):
    """Stops a row once its completion (not its prompt) contains a stop string.

    transformers' own `stop_strings` also matches text that spans the end of the prompt (a
    chat prompt ends in a newline, so "\n\n" would stop after one generated newline), which is
    not what the OpenAI API means by `stop`.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopInCompletion(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopInCompletion()])
