"""The request cache: a second run asks the server nothing; failures and changed requests are asked again."""

from __future__ import annotations

import dataclasses
import itertools

import os
import time

import pytest

from pipeline.backends import BackendOptions, Request, make_client, open_client
from pipeline.cache import STALE_TMP_SECONDS, CachedClient, request_key
from pipeline.errors import UserError
from tests.fakes import FakeClient


def requests(n=3, **params):
    return [Request(f"k{i}", messages=({"role": "user", "content": f"task {i}"},), **params) for i in range(n)]


def cached_openai(server, cache_dir, **overrides):
    options = dict(backend="openai", base_url=server.base_url, model="fake-model", max_retries=1,
                   retry_base_delay=0.01, concurrency=4)
    options.update(overrides)
    return CachedClient(make_client(BackendOptions(**options)), cache_dir)


def test_second_run_makes_no_requests_to_the_server(fake_openai, tmp_path):
    first = cached_openai(fake_openai, tmp_path)
    answers = {r.request.key: r.texts for r in first.stream(requests())}
    first.close()
    assert fake_openai.requests == 3 and first.totals.cached == 0

    second = cached_openai(fake_openai, tmp_path)
    again = list(second.stream(requests()))
    second.close()
    assert fake_openai.requests == 3
    assert {r.request.key: r.texts for r in again} == answers
    assert all(r.cached and r.request_id.startswith("chatcmpl-") for r in again)
    assert (second.totals.requests, second.totals.cached) == (3, 3)


def test_failed_requests_are_not_cached(fake_openai, tmp_path):
    fake_openai.faults = ["500", "500"]
    client = cached_openai(fake_openai, tmp_path, concurrency=1)
    [failed] = client.stream(requests(1))
    [answered] = client.stream(requests(1))
    client.close()
    assert failed.error and answered.error is None and not answered.cached
    assert fake_openai.requests == 3


def test_key_covers_sampling_params_model_and_server_but_not_the_callers_id():
    request = requests(1)[0]
    key = request_key(request, "openai", "m", "chat")
    assert request_key(dataclasses.replace(request, key="other"), "openai", "m", "chat") == key
    for changed in (dataclasses.replace(request, temperature=0.5), dataclasses.replace(request, n=2),
                    dataclasses.replace(request, top_p=0.5), dataclasses.replace(request, max_tokens=7),
                    dataclasses.replace(request, messages=({"role": "user", "content": "課題 0"},)),
                    dataclasses.replace(request, stop=("\n",)), dataclasses.replace(request, seed=1),
                    dataclasses.replace(request, messages=({"role": "user", "content": "task 9"},))):
        assert request_key(changed, "openai", "m", "chat") != key
    assert request_key(request, "openai", "m2", "chat") != key
    assert request_key(request, "openai", "m", "completions") != key
    assert request_key(request, "openai", "m", "chat", "http://other:8000/v1") != key
    assert request_key(request, "openai", "m", "chat", "http://a:8000/v1") != \
        request_key(request, "openai", "m", "chat", "http://b:8000/v1")


def test_another_server_never_replays_this_ones_answers(fake_openai, tmp_path):
    from tests.fake_openai_server import FakeOpenAIServer

    first = opened(fake_openai.base_url, tmp_path)
    list(first.stream(requests()))
    first.close()
    with FakeOpenAIServer(answer=lambda body: "the other server") as other:
        second = opened(other.base_url, tmp_path)
        answers = list(second.stream(requests()))
        second.close()
        assert other.requests == 3 and all(r.texts == ["the other server"] and not r.cached for r in answers)
    again = opened(fake_openai.base_url, tmp_path)  # the first server's answers are still there
    assert all(r.cached for r in again.stream(requests()))
    again.close()


def opened(url, tmp_path, **overrides):
    options = dict(backend="openai", base_url=url, model="fake-model", max_retries=1, retry_base_delay=0.01,
                   concurrency=4, cache_dir=str(tmp_path / "cache"))
    options.update(overrides)
    return open_client(BackendOptions(**options))


def test_an_unusable_cache_dir_fails_before_the_first_request(fake_openai, tmp_path):
    (tmp_path / "a-file").write_text("not a folder\n")
    with pytest.raises(UserError, match="^--cache-dir .*a-file/cache: .*a-file is a file"):
        opened(fake_openai.base_url, tmp_path, cache_dir=str(tmp_path / "a-file" / "cache"))
    assert fake_openai.requests == 0
    opened(fake_openai.base_url, tmp_path, cache=False, cache_dir=str(tmp_path / "a-file" / "cache")).close()


def test_temporary_files_a_killed_writer_left_are_removed(tmp_path):
    client = CachedClient(FakeClient(lambda r: "x"), tmp_path)
    list(client.stream(requests(1)))
    [entry] = [p for p in tmp_path.rglob("*.json")]
    stale = entry.parent / f".{entry.name}.k3j4.tmp"
    fresh = entry.parent / f".{entry.name}.a1b2.tmp"  # another run may be writing it right now
    for path in (stale, fresh):
        path.write_text('{"texts": ["half', encoding="utf-8")
    old = time.time() - 2 * STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    CachedClient(FakeClient(lambda r: "x"), tmp_path)
    assert not stale.exists() and fresh.exists() and entry.exists()


def test_hits_and_misses_mix_and_a_pure_hit_stream_stays_lazy(tmp_path):
    inner = FakeClient(lambda r: f"answer {r.key}")
    client = CachedClient(inner, tmp_path)
    list(client.stream(requests(2)))
    mixed = list(client.stream(requests(4)))
    assert sorted((r.request.key, r.cached) for r in mixed) == [("k0", True), ("k1", True), ("k2", False), ("k3", False)]
    assert len(inner.seen) == 4

    endless = (Request("same", prompt="p") for _ in itertools.count())
    list(client.stream([Request("same", prompt="p")]))
    first_five = list(itertools.islice(client.stream(endless), 5))
    assert [r.cached for r in first_five] == [True] * 5


def test_entries_are_whole_files_and_a_damaged_one_is_a_miss(tmp_path):
    inner = FakeClient(lambda r: "fresh")
    client = CachedClient(inner, tmp_path)
    list(client.stream(requests(1)))
    [entry] = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert entry.suffix == ".json" and not entry.name.startswith(".")
    entry.write_text('{"texts": ["cut off', encoding="utf-8")
    [response] = client.stream(requests(1))
    assert not response.cached and len(inner.seen) == 2


def test_disabled_cache_passes_everything_through(tmp_path):
    inner = FakeClient(lambda r: "x")
    client = CachedClient(inner, tmp_path, enabled=False)
    list(client.stream(requests(2)))
    list(client.stream(requests(2)))
    assert len(inner.seen) == 4 and not any(tmp_path.iterdir())
