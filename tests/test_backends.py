"""The openai backend against a real HTTP server on 127.0.0.1, and the local backend on real models."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import pytest

from pipeline.backends import BackendOptions, Request, backend_options_from, make_client
from pipeline.errors import UserError

SECRET = "sk-test-DO-NOT-LOG-9f8e7d6c5b4a"
# Fault tests use a tight client timeout so a hung request costs little.
TEST_TIMEOUT = 0.5


def openai_client(server, **overrides):
    options = dict(backend="openai", base_url=server.base_url, model="fake-model", timeout=TEST_TIMEOUT,
                   max_retries=3, retry_base_delay=0.01, concurrency=1)
    options.update(overrides)
    return make_client(BackendOptions(**options))


def ask(client, *requests):
    return list(client.stream(requests))


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("field, value, flag", [
    ("concurrency", 0, "--concurrency"), ("timeout", 0, "--timeout"), ("max_retries", -1, "--max-retries"),
    ("batch_size", 0, "--batch-size"), ("api", "responses", "--api"), ("backend", "vllm", "--backend"),
])
def test_bad_options_name_the_flag(field, value, flag):
    with pytest.raises(UserError, match=f"^{flag}:"):
        BackendOptions(**{field: value})


def test_backend_options_from_a_stage_config_reads_the_shared_fields():
    @dataclass(frozen=True)
    class StageConfig:
        out: str = "x.jsonl"
        backend: str = "openai"
        model: str = "gpt-4o-mini"
        concurrency: int = 3
        seed: int | None = None

    options = backend_options_from(StageConfig())
    assert (options.backend, options.model, options.concurrency, options.seed) == ("openai", "gpt-4o-mini", 3, None)
    assert options.max_retries == BackendOptions().max_retries


# ---------------------------------------------------------------- openai: answers


def test_chat_answers_with_texts_usage_ids_and_sends_sampling_params(fake_openai):
    fake_openai.answer = lambda body: ["first", "second"]
    client = openai_client(fake_openai, seed=7)
    request = Request("r1", messages=({"role": "user", "content": "name two colours"},), temperature=0.3,
                      top_p=0.9, max_tokens=20, stop=("\n\n",), n=2)
    [response] = ask(client, request)
    client.close()
    assert response.request is request and response.error is None
    assert response.texts == ["first", "second"] and response.finish_reasons == ["stop", "stop"]
    assert (response.prompt_tokens, response.completion_tokens) == (3, 2)
    assert response.request_id.startswith("chatcmpl-") and response.backend == "openai"
    body = fake_openai.bodies[0]
    assert body["messages"] == [{"role": "user", "content": "name two colours"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"], body["n"], body["seed"]) == \
        (0.3, 0.9, 20, ["\n\n"], 2, 7)
    assert client.totals.requests == 1 and client.totals.completion_tokens == 2


def test_completions_api_sends_the_raw_prompt(fake_openai):
    client = openai_client(fake_openai, api="completions")
    [raw] = ask(client, Request("a", prompt="Instruction 1:"))
    [chat] = ask(client, Request("b", messages=({"role": "user", "content": "one turn"},)))
    with pytest.raises(UserError, match="--api completions"):
        ask(client, Request("c", messages=({"role": "system", "content": "s"}, {"role": "user", "content": "u"})))
    client.close()
    assert raw.texts == ["answer to: Instruction 1:"] and raw.request_id.startswith("cmpl-")
    assert [b["prompt"] for b in fake_openai.bodies] == ["Instruction 1:", "one turn"]
    assert chat.error is None


@pytest.mark.parametrize("reason", ["length", "content_filter"])
def test_finish_reason_reaches_the_caller(fake_openai, reason):
    fake_openai.finish_reason = reason
    client = openai_client(fake_openai)
    [response] = ask(client, Request("a", prompt="p"))
    client.close()
    assert response.finish_reasons == [reason]


# ---------------------------------------------------------------- openai: faults


@pytest.mark.parametrize("fault", ["500", "503", "drop", "malformed", "hang"])
def test_each_fault_is_survived_with_one_retry(fake_openai, fault):
    fake_openai.faults = [fault]
    client = openai_client(fake_openai)
    [response] = ask(client, Request("a", prompt="p"))
    client.close()
    assert response.error is None and response.texts == ["answer to: p"]
    assert response.retries == 1 and client.totals.retries == 1 and client.totals.failures == 0
    assert fake_openai.requests == 2


def test_429_waits_for_retry_after(fake_openai):
    fake_openai.faults = ["429", "429"]
    fake_openai.retry_after = "1"
    client = openai_client(fake_openai)
    start = time.monotonic()
    [response] = ask(client, Request("a", prompt="p"))
    elapsed = time.monotonic() - start
    client.close()
    assert response.error is None and client.totals.retries == 2
    # The SDK's own backoff would wait about 0.5 s then 1 s, at most 25% less; Retry-After says 1 s each.
    assert elapsed >= 2.0


def test_a_request_that_exhausts_its_retries_is_reported_and_the_stream_goes_on(fake_openai):
    fake_openai.faults = ["500", "500"]
    client = openai_client(fake_openai, max_retries=1)
    failed, answered = ask(client, Request("a", prompt="p"), Request("b", prompt="q"))
    client.close()
    assert failed.request.key == "a" and failed.error.startswith("HTTP 500") and failed.texts == []
    assert answered.request.key == "b" and answered.error is None
    assert client.totals.failures == 1 and client.totals.retries == 1 and client.totals.requests == 2


def test_malformed_bodies_share_the_retry_budget(fake_openai):
    fake_openai.faults = ["malformed", "malformed", "malformed"]
    client = openai_client(fake_openai, max_retries=2)
    [response] = ask(client, Request("a", prompt="p"))
    client.close()
    assert response.error.startswith("malformed response") and response.retries == 2
    assert fake_openai.requests == 3


@pytest.mark.parametrize("status, message", [
    ("401", "authentication failed at {url}: check OPENAI_API_KEY"),
    ("403", "permission denied at {url}: check OPENAI_API_KEY and access to model 'fake-model'"),
    ("404", "not found at {url}/chat/completions: check --model 'fake-model', --api chat and --base-url"),
    ("400", "request rejected at {url} (400): This model's maximum context length was exceeded."),
])
def test_client_errors_fail_at_once_with_one_clear_line(fake_openai, status, message):
    fake_openai.faults = [status]
    client = openai_client(fake_openai, max_retries=5, concurrency=4)
    with pytest.raises(UserError) as caught:
        ask(client, *(Request(str(i), prompt="p") for i in range(4)))
    client.close()
    assert str(caught.value) == message.format(url=fake_openai.base_url)
    assert caught.value.__cause__ is None and "\n" not in str(caught.value)
    assert client.totals.retries == 0


def test_the_key_is_never_logged_or_written(fake_openai, monkeypatch, caplog, tmp_path, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    fake_openai.faults = ["429", "500", "malformed", "drop"]
    fake_openai.retry_after = "0"  # falls back to the SDK backoff; keeps the test short
    from pipeline.cache import CachedClient

    client = CachedClient(openai_client(fake_openai, max_retries=5), tmp_path / "cache")
    responses = ask(client, Request("a", prompt="p"), Request("b", prompt="q"))
    # Whatever a library logs at DEBUG from here on, the key is scrubbed from it.
    logging.getLogger("openai._base_client").debug("headers: Authorization: Bearer %s", SECRET)
    fake_openai.faults = ["401"]
    with pytest.raises(UserError) as caught:
        ask(client, Request("c", prompt="r"))
    client.close()
    assert [r.error for r in responses] == [None, None]
    assert fake_openai.authorizations[-1] == f"Bearer {SECRET}"  # it was really sent
    assert caplog.records and all(SECRET not in record.getMessage() for record in caplog.records)
    assert SECRET not in caplog.text and SECRET not in str(caught.value)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(SECRET not in p.read_text(encoding="utf-8") for p in files)


# ---------------------------------------------------------------- openai: concurrency


def test_requests_run_concurrently(fake_openai):
    fake_openai.latency = 0.1
    client = openai_client(fake_openai, concurrency=8, timeout=5.0)
    start = time.monotonic()
    responses = ask(client, *(Request(str(i), prompt=f"p{i}") for i in range(16)))
    elapsed = time.monotonic() - start
    client.close()
    assert sorted(int(r.request.key) for r in responses) == list(range(16))
    assert all(r.texts == [f"answer to: p{r.request.key}"] for r in responses)
    # One after another this takes 1.6 s; 8 at a time, two rounds of 0.1 s plus overhead.
    assert elapsed < 0.8


def test_requests_are_pulled_only_when_a_slot_is_free_and_breaking_cancels(fake_openai):
    fake_openai.latency = 0.2
    pulled = []

    def requests():
        for i in itertools.count():
            pulled.append(i)
            yield Request(str(i), prompt="p")

    client = openai_client(fake_openai, concurrency=4, timeout=5.0)
    stream = client.stream(requests())
    next(stream)
    assert len(pulled) == 4  # the first four are in flight; no more pulled until one finishes
    stream.close()
    client.close()
    assert len(pulled) == 4 and fake_openai.requests <= 4


# ---------------------------------------------------------------- local


def local_client(model, **overrides):
    return make_client(BackendOptions(backend="local", model=str(model), device="cpu", **overrides))


def chat(key, text, **params):
    return Request(key, messages=({"role": "user", "content": text},), **params)


def test_local_generates_with_a_tiny_model(tiny_model_dir):
    client = local_client(tiny_model_dir, batch_size=4)
    responses = ask(client, chat("a", "Say hi.", max_tokens=5, n=2), Request("b", prompt="Once upon", max_tokens=5))
    by_key = {r.request.key: r for r in responses}
    assert len(by_key["a"].texts) == 2 and len(by_key["b"].texts) == 1
    for response in responses:
        assert response.backend == "local" and response.prompt_tokens > 0 and response.error is None
        assert set(response.finish_reasons) <= {"stop", "length"}
        assert 0 < response.completion_tokens <= 5 * len(response.texts)
    assert client.totals.requests == 2
    assert client.totals.completion_tokens == sum(r.completion_tokens for r in responses)


def test_local_seed_makes_sampling_repeatable(tiny_model_dir):
    requests = [chat(str(i), f"Tell me about {i}.", temperature=1.0, max_tokens=6) for i in range(3)]
    first = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, seed=3), *requests)}
    again = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, seed=3), *requests)}
    other = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, seed=4), *requests)}
    assert first == again and first != other


def test_local_left_padding_matches_unbatched_greedy(tiny_model_dir):
    prompts = ["Hi.", "Write a long story about a cat who lives in a lighthouse by the sea.", "Two plus two?"]
    requests = [chat(str(i), p, temperature=0, max_tokens=6) for i, p in enumerate(prompts)]
    batched = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, batch_size=3), *requests)}
    alone = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, batch_size=1), *requests)}
    assert batched == alone


def test_local_stop_strings_cut_the_text(tiny_model_dir):
    client = local_client(tiny_model_dir)
    [free] = ask(client, chat("a", "Hello there", temperature=0, max_tokens=12))
    text = free.texts[0]
    assert free.finish_reasons == ["length"] and len(text) > 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    [stopped] = ask(client, chat("a", "Hello there", temperature=0, max_tokens=12, stop=(stop,)))
    assert stopped.texts == [text[:text.find(stop)]] and stopped.finish_reasons == ["stop"]


def test_local_model_that_is_not_a_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--model"):
        local_client(tmp_path / "missing")


@pytest.mark.slow
def test_local_answers_with_the_embedded_model():
    client = local_client("SmolLM2-135M-Instruct")
    [response] = ask(client, chat("a", "What is the capital of France?", temperature=0, max_tokens=12))
    assert response.error is None and response.model == "SmolLM2-135M-Instruct"
    assert "Paris" in response.texts[0]
    assert response.prompt_tokens > 5 and 0 < response.completion_tokens <= 12
