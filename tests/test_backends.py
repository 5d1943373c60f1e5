"""The openai backend against a real HTTP server on 127.0.0.1 (the local backend: tests/test_local_backend.py)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import pytest

from pipeline.backends import BackendOptions, Request, make_client, open_client
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


def test_a_stage_config_is_backend_options_and_of_takes_its_backend_part():
    @dataclass(frozen=True)
    class StageConfig(BackendOptions):
        out: str = "x.jsonl"

    cfg = StageConfig(backend="openai", model="gpt-4o-mini", concurrency=3, seed=None, cache_dir="c")
    judge = BackendOptions.of(cfg, model="judge-model")
    assert type(judge) is BackendOptions and not hasattr(judge, "out")
    assert (judge.backend, judge.model, judge.concurrency, judge.seed, judge.cache_dir) == \
        ("openai", "judge-model", 3, None, "c")
    assert judge.max_retries == BackendOptions().max_retries
    with pytest.raises(UserError, match="^--concurrency:"):
        StageConfig(concurrency=0)  # the stage's config checks the backend fields itself


def test_no_message_names_a_flag_that_does_not_exist():
    from pipeline.cli import build_parser

    flags = {option for action in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
             for option in action.option_strings}
    with pytest.raises(UserError) as caught:
        BackendOptions(retry_base_delay=-1)
    assert not str(caught.value).startswith("--") and "--retry-base-delay" not in flags


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


@pytest.mark.parametrize("faults, max_retries, error, retries, sent", [
    # A 500 then a malformed body: the budget of 1 is spent by the 500, so the malformed answer
    # is the end (this drove the budget to -1 and crashed the stage).
    (["500", "malformed"], 1, "malformed response from {url}", 1, 2),
    (["500", "500", "malformed", "malformed"], 3, "malformed response from {url}", 3, 4),
    # The SDK does not retry these: none happened, none is counted.
    (["402"], 3, "HTTP 402 from {url}: You exceeded your current quota", 0, 1),
    (["413"], 3, "HTTP 413 from {url}: Request entity too large.", 0, 1),
    # A 429 that outlasts the budget fails this request; it is not fatal for the stage.
    (["429", "429", "429"], 2, "HTTP 429 from {url}: Rate limit reached", 2, 3),
])
def test_retries_are_counted_as_they_happened(fake_openai, faults, max_retries, error, retries, sent):
    fake_openai.faults = list(faults)
    fake_openai.retry_after = "0"  # the SDK's own short backoff
    client = openai_client(fake_openai, max_retries=max_retries)
    failed, answered = ask(client, Request("a", prompt="p"), Request("b", prompt="q"))
    client.close()
    assert failed.error.startswith(error.format(url=fake_openai.base_url)), failed.error
    assert not failed.rejected and failed.retries == retries
    assert answered.error is None and answered.texts == ["answer to: q"]
    assert client.totals.retries == retries and client.totals.failures == 1
    assert fake_openai.requests == sent + 1


@pytest.mark.parametrize("status, message", [
    ("400", "This model's maximum context length was exceeded."),
    ("422", "Input contains content that our safety system does not allow."),
])
def test_a_400_or_422_rejects_that_request_and_the_stream_goes_on(fake_openai, status, message):
    fake_openai.faults = [status]
    client = openai_client(fake_openai, max_retries=3)
    rejected, answered = ask(client, Request("a", prompt="p"), Request("b", prompt="q"))
    client.close()
    assert rejected.rejected and rejected.error == f"request rejected at {fake_openai.base_url} ({status}): {message}"
    assert rejected.retries == 0 and rejected.texts == []
    assert answered.error is None
    assert (client.totals.rejected, client.totals.failures, client.totals.retries) == (1, 0, 0)
    assert fake_openai.requests == 2


@pytest.mark.parametrize("status, message", [
    ("401", "authentication failed at {url}: check OPENAI_API_KEY"),
    ("403", "permission denied at {url}: check OPENAI_API_KEY and access to model 'fake-model'"),
    ("404", "not found at {url}/chat/completions: check --model 'fake-model', --api chat and --base-url"),
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


# ---------------------------------------------------------------- open_client: limits, dead servers, URLs


def opened(server_url, tmp_path, **overrides):
    options = dict(backend="openai", base_url=server_url, model="fake-model", timeout=TEST_TIMEOUT, max_retries=1,
                   retry_base_delay=0.01, concurrency=4, cache_dir=str(tmp_path / "cache"))
    options.update(overrides)
    return open_client(BackendOptions(**options))


def test_a_dead_server_stops_at_once_with_the_url_and_the_real_error(tmp_path):
    client = opened("http://127.0.0.1:9/v1", tmp_path, concurrency=16)
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield Request(str(i), prompt="p")

    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        list(client.stream(endless()))
    client.close()
    assert str(caught.value) == ("cannot connect to http://127.0.0.1:9/v1: connection refused "
                                 "(the first 8 requests all failed after their retries)")
    assert time.monotonic() - start < 60 and len(pulled) <= 16 + 8


def test_when_the_first_8_requests_are_all_rejected_the_stage_stops_with_the_servers_message(fake_openai, tmp_path):
    fake_openai.faults = ["400"] * 100
    client = opened(fake_openai.base_url, tmp_path, concurrency=1)
    with pytest.raises(UserError) as caught:
        ask(client, *(Request(str(i), prompt=f"p{i}") for i in range(20)))
    client.close()
    assert str(caught.value) == (f"request rejected at {fake_openai.base_url} (400): This model's maximum context "
                                 "length was exceeded. (the first 8 requests all were rejected)")
    assert fake_openai.requests == 8


def test_a_rejection_after_an_answer_is_one_requests_problem(fake_openai, tmp_path):
    fake_openai.faults = [None] + ["422"] * 12
    client = opened(fake_openai.base_url, tmp_path, concurrency=1)
    responses = ask(client, *(Request(str(i), prompt=f"p{i}") for i in range(13)))
    client.close()
    assert [r.rejected for r in responses] == [False] + [True] * 12


def test_the_token_limit_reserves_max_tokens_before_sending(fake_openai, tmp_path):
    fake_openai.latency = 0.05
    fake_openai.answer = lambda body: " ".join(["word"] * 40)  # 40 completion tokens, a few prompt tokens
    client = opened(fake_openai.base_url, tmp_path, concurrency=64, max_tokens_total=500, cache=False, timeout=5.0)
    requests = [Request(str(i), prompt=f"question number {i}", max_tokens=100) for i in range(64)]
    responses = ask(client, *requests)
    client.close()
    spent = sum(r.prompt_tokens + r.completion_tokens for r in responses)
    one_request = max(r.prompt_tokens + r.completion_tokens for r in responses)
    assert client.stopped == "max_tokens_total" and 500 <= spent <= 500 + one_request
    # 64 slots, but each request holds 100 tokens (and its prompt) of the 500 while in flight.
    assert fake_openai.peak_in_flight <= 5 and len(responses) < 64
    assert client.totals.sent == fake_openai.requests == len(responses)


def test_the_dollar_budget_is_a_token_limit(fake_openai, tmp_path):
    client = opened(fake_openai.base_url, tmp_path, concurrency=8, price_per_1k=2.0, budget=0.1, cache=False)
    responses = ask(client, *(Request(str(i), prompt="p", max_tokens=10) for i in range(200)))
    client.close()
    spent = sum(r.prompt_tokens + r.completion_tokens for r in responses)
    assert client.stopped == "budget" and 50 <= spent <= 50 + 10 and len(responses) < 200


def test_requests_cut_short_count_as_abandoned(fake_openai):
    fake_openai.latency = 0.3
    client = openai_client(fake_openai, concurrency=4, timeout=5.0)
    stream = client.stream(Request(str(i), prompt="p") for i in range(10))
    next(stream)
    stream.close()
    client.close()
    assert fake_openai.requests == 4
    assert (client.totals.requests, client.totals.abandoned, client.totals.sent) == (1, 3, 4)


URL_CASES = [
    ("http://user:sk-secret-1@host:8000/v1", "http://[redacted]@host:8000/v1"),
    ("https://sk-only-key@api.example.com/v1?api_key=sk-q&model=m#top",
     "https://[redacted]@api.example.com/v1?api_key=[redacted]&model=m#top"),
    ("http://u:p@ss@host/v1?X-Amz-Signature=abc&access_token=t&page=2",
     "http://[redacted]@host/v1?X-Amz-Signature=[redacted]&access_token=[redacted]&page=2"),
    ("http://ユーザー:秘密の鍵@例え.jp/v1?token=秘密", "http://[redacted]@例え.jp/v1?token=[redacted]"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
]


@pytest.mark.parametrize("url, shown", URL_CASES)
def test_urls_are_shown_without_credentials(url, shown):
    from pipeline.urls import redact_url, redact_urls

    assert redact_url(url) == shown
    assert redact_urls(f"cannot connect to {url}: refused") == f"cannot connect to {shown}: refused"


def test_credentials_in_the_url_never_reach_messages_logs_or_files(fake_openai, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    url = fake_openai.base_url.replace("http://", "http://alice:sk-url-SECRET-77@")
    monkeypatch.setenv("OPENAI_BASE_URL", url)  # from the environment, as a user would set it
    fake_openai.faults = ["500", "401"]
    client = opened(None, tmp_path, max_retries=1)
    with pytest.raises(UserError) as caught:
        ask(client, Request("a", prompt="p"))
    client.close()
    assert str(caught.value) == f"authentication failed at {fake_openai.base_url.replace('http://', 'http://[redacted]@')}" \
                                ": check OPENAI_API_KEY"
    assert "sk-url-SECRET-77" not in caplog.text and "alice" not in caplog.text


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
