"""The local backend: continuous batching on a tiny model (and the embedded one), threads, precision."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline import models
from pipeline.backends import BackendOptions, Request, make_client, open_client
from pipeline.errors import UserError


def local_client(model, **overrides):
    return make_client(BackendOptions(backend="local", model=str(model), device="cpu", **overrides))


def ask(client, *requests):
    return list(client.stream(requests))


def chat(key, text, **params):
    return Request(key, messages=({"role": "user", "content": text},), **params)


def reference_greedy(client, request: Request) -> str:
    """What `model.generate` answers to this one request alone, greedily, cut at its stop strings."""
    text, templated = client._render(request)
    encoded = client.tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    with torch.inference_mode():
        output = client.lm.generate(**encoded, max_new_tokens=request.max_tokens, do_sample=False, temperature=None,
                                    top_p=None, top_k=None, pad_token_id=client.tokenizer.pad_token_id)
    row = output[0, encoded["input_ids"].shape[1]:].tolist()
    end = next((i for i, t in enumerate(row) if t in client._eos), len(row))
    answer = client.tokenizer.decode(row[:end], skip_special_tokens=True)
    cuts = [answer.find(s) for s in request.stop or () if s in answer]
    return answer[:min(cuts)] if cuts else answer


MIXED_PROMPTS = ["Hi.", "Write a long story about a cat who lives in a lighthouse by the sea.", "Two plus two?",
                 "日本の首都はどこですか？一文で答えてください。", "List three colours.", "Say something."]


def test_local_generates_with_a_tiny_model(tiny_model_dir):
    client = local_client(tiny_model_dir, batch_size=4)
    responses = ask(client, chat("a", "Say hi.", max_tokens=5, n=2), Request("b", prompt="Once upon", max_tokens=5))
    by_key = {r.request.key: r for r in responses}
    assert len(by_key["a"].texts) == 2 and len(by_key["b"].texts) == 1
    for response in responses:
        assert response.backend == "local" and response.prompt_tokens > 0 and response.error is None
        assert set(response.finish_reasons) <= {"stop", "length"}
        assert 0 < response.completion_tokens <= 5 * len(response.texts)
        assert response.engine.startswith("torch-") and "continuous-batching" in response.engine
        assert response.precision == client.precision and response.precision in ("fp32", "bf16")
    assert client.totals.requests == 2
    assert client.totals.completion_tokens == sum(r.completion_tokens for r in responses)


def test_engine_and_precision_survive_the_request_cache(tiny_model_dir, tmp_path):
    options = BackendOptions(backend="local", model=str(tiny_model_dir), device="cpu", cache_dir=str(tmp_path))
    request = chat("a", "日本語で挨拶してください。", temperature=0, max_tokens=4)
    [fresh] = ask(open_client(options), request)
    [replayed] = ask(open_client(options), request)
    assert replayed.cached and not fresh.cached
    assert (replayed.engine, replayed.precision) == (fresh.engine, fresh.precision) != ("", "")


def test_local_seed_makes_sampling_repeatable_whatever_shares_the_batch(tiny_model_dir):
    requests = [chat(str(i), f"Tell me about {i}.", temperature=1.0, max_tokens=6) for i in range(3)]
    first = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, seed=3), *requests)}
    again = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, seed=3), *requests)}
    alone = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, seed=3, batch_size=1), *requests)}
    other = {r.request.key: r.texts for r in ask(local_client(tiny_model_dir, seed=4), *requests)}
    assert first == again == alone and first != other


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_continuous_batching_answers_as_each_request_alone(tiny_model_dir, batch_size):
    # Different lengths, limits and stop strings make rows leave at different steps, so waiting
    # rows join a running batch (padding it, or being padded) in every way.
    client = local_client(tiny_model_dir, batch_size=batch_size)
    requests = [chat(str(i), p, temperature=0, max_tokens=3 + 4 * (i % 3), stop=("の",) if i == 3 else None)
                for i, p in enumerate(MIXED_PROMPTS)]
    requests.append(Request("raw", prompt="昔々、ある村に", temperature=0, max_tokens=9))
    answers = {r.request.key: r.texts[0] for r in ask(client, *requests)}
    assert answers == {r.key: reference_greedy(client, r) for r in requests}


def test_local_stop_strings_cut_the_text(tiny_model_dir):
    client = local_client(tiny_model_dir)
    [free] = ask(client, chat("a", "Hello there", temperature=0, max_tokens=12))
    text = free.texts[0]
    assert free.finish_reasons == ["length"] and len(text) > 4 and free.completion_tokens == 12
    stop = text[len(text) // 2:len(text) // 2 + 2]
    [stopped] = ask(client, chat("a", "Hello there", temperature=0, max_tokens=12, stop=(stop,)))
    assert stopped.texts == [text[:text.find(stop)]] and stopped.finish_reasons == ["stop"]
    assert stopped.completion_tokens < 12  # the row left the batch when the stop string appeared


def test_a_finished_row_frees_its_slot_for_a_waiting_request(tiny_model_dir):
    client = local_client(tiny_model_dir, batch_size=2)
    calls = []  # (rows, tokens) of every forward pass
    client.lm.register_forward_hook(lambda module, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    short, long, waiting = (chat("short", "Hi.", temperature=0, max_tokens=2),
                            chat("long", "Hi there.", temperature=0, max_tokens=10),
                            chat("waiting", "Hello.", temperature=0, max_tokens=10))
    ask(client, short, long, waiting)
    joined = next(i for i, (rows, tokens) in enumerate(calls) if i > 0 and rows == 1 and tokens > 1)
    # The waiting request was prefilled while "long" was still generating, and both went on together.
    assert joined < 6 and calls[joined + 1] == (2, 1)
    assert len(calls) < 1 + 10 + 1 + 10  # fewer passes than a batch that waits on its longest answer


def test_local_model_that_is_not_a_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--model"):
        local_client(tmp_path / "missing")


def test_threads_respect_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert models.free_cores() == 3


def test_threads_are_the_free_cores_at_least_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert models.free_cores() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.8, 0.0, 0.0))
    assert models.free_cores() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 7.0, 0.0, 0.0))
    assert models.free_cores() == 1


def test_threads_are_set_when_the_local_backend_opens(tiny_model_dir, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        client = local_client(tiny_model_dir)
        assert client.threads == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_precision_is_bf16_on_a_cpu_with_amx_else_fp32(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_amx", lambda: True)
    assert models.local_dtype("cpu") == "bf16" and models.local_dtype("cpu", "fp32") == "fp32"
    monkeypatch.setattr(models, "cpu_has_amx", lambda: False)
    assert models.local_dtype("cpu") == "fp32"


def test_amx_is_read_from_cpuinfo_and_avx512_bf16_alone_is_not_enough(tmp_path, monkeypatch):
    # AVX-512 BF16 without AMX decoded 4.5x slower in bf16 than in fp32 (bench/bench_local.py).
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(models, "CPUINFO", str(cpuinfo))
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile sse\n", encoding="utf-8")
    assert models.cpu_has_amx()
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 sse\n", encoding="utf-8")
    assert not models.cpu_has_amx()


@pytest.mark.slow
def test_local_answers_with_the_embedded_model():
    client = local_client("SmolLM2-135M-Instruct")
    [response] = ask(client, chat("a", "What is the capital of France?", temperature=0, max_tokens=12))
    assert response.error is None and response.model == "SmolLM2-135M-Instruct"
    assert "Paris" in response.texts[0]
    assert response.prompt_tokens > 5 and 0 < response.completion_tokens <= 12


@pytest.mark.slow
def test_embedded_model_batched_answers_equal_each_alone():
    client = local_client("SmolLM2-135M-Instruct", batch_size=3)
    requests = [chat("ja", "日本の首都はどこですか？", temperature=0, max_tokens=16),
                chat("stop", "Name three fruits.", temperature=0, max_tokens=24, stop=("\n",)),
                chat("long", "Explain what a hash table is.", temperature=0, max_tokens=20),
                chat("short", "Say yes.", temperature=0, max_tokens=4)]
    answers = {r.request.key: r.texts[0] for r in ask(client, *requests)}
    assert answers == {r.key: reference_greedy(client, r) for r in requests}
