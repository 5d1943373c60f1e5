"""A fake LLM client for stage tests: canned answers from a function, no network, no model.

The real `openai` backend is tested against a real HTTP server in test_backends.py; stage
tests that only need "the model said X" use this, as simonw/llm's tests do.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from pipeline.backends import Request, Response, Totals

Answer = str | list[str] | Response


class FakeClient:
    """Answers each request with `answer(request)`: a text, a list of texts (n), or a Response."""

    backend = "fake"

    def __init__(self, answer: Callable[[Request], Answer], model: str = "fake-model", finish_reason: str = "stop"):
        self.answer = answer
        self.model = model
        self.finish_reason = finish_reason
        self.totals = Totals()
        self.seen: list[Request] = []

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]:
        for request in requests:
            self.seen.append(request)
            self.totals.requests += 1
            answer = self.answer(request)
            if isinstance(answer, Response):
                yield answer
                continue
            texts = [answer] if isinstance(answer, str) else list(answer)
            tokens = sum(len(t.split()) for t in texts)
            self.totals.completion_tokens += tokens
            self.totals.prompt_tokens += 10
            yield Response(request=request, texts=texts, finish_reasons=[self.finish_reason] * len(texts),
                           prompt_tokens=10, completion_tokens=tokens, request_id=f"fake-{self.totals.requests}",
                           model=self.model, backend=self.backend)

    def close(self) -> None:
        pass
