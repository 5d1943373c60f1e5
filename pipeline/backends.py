"""LLM backends behind one small interface: `openai` (any OpenAI-compatible server) and `local`.

INTERFACE SKETCH (issue 4 fills in the implementations; stages code against this):

    client = make_client(BackendOptions(...))      # or a fake in tests
    for response in client.stream(requests):       # requests: any iterable, pulled lazily
        ...                                        # responses arrive in completion order
    client.totals                                  # requests, retries, failures, tokens
    client.close()

`stream` pulls a new request from the iterable only when a slot is free (at most
`concurrency` in flight), so a stage like `generate` can build each prompt from the pool as it
is at that moment. Breaking out of the loop (closing the generator) cancels what is in flight.
A request that fails for good yields a Response with `error` set; it never raises, except
for errors that no retry can fix (401/403/404/400 -> UserError with one clear line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Protocol


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


@dataclass
class Totals:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LLMClient(Protocol):
    backend: str
    model: str
    totals: Totals

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]: ...

    def close(self) -> None: ...


Api = Literal["chat", "completions"]
