"""The local backend: continuous batching on a tiny model (and the embedded one), threads, precision."""

from __future__ import annotations

import pytest
import torch

from pipeline import batching, local_backend, models
from pipeline.backends import BackendOptions, Request, make_client, open_client
from pipeline.cpu_attention import FP32_ATTENTION
from pipeline.errors import UserError
from pipeline.local_backend import BF16_FP32_ATTENTION_NAME, LocalClient


def local_client(model, **overrides):
    """The local backend as the pipeline opens it, in the precision it picks for this CPU."""
    return make_client(BackendOptions(backend="local", model=str(model), device="cpu", **overrides))


def exact_client(model, dtype: str = "fp32", **overrides) -> LocalClient:
    """The local backend pinned to fp32: batched answers equal answers alone only where every
    row's arithmetic is exact (bf16 matmuls round differently with the batch's shape)."""
    return LocalClient(BackendOptions(backend="local", model=str(model), device="cpu", **overrides), dtype=dtype)


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
        assert response.precision == client.precision
        assert response.precision in ("fp32", "bf16", BF16_FP32_ATTENTION_NAME)
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
    first = {r.request.key: r.texts for r in ask(exact_client(tiny_model_dir, seed=3), *requests)}
    again = {r.request.key: r.texts for r in ask(exact_client(tiny_model_dir, seed=3), *requests)}
    alone = {r.request.key: r.texts for r in ask(exact_client(tiny_model_dir, seed=3, batch_size=1), *requests)}
    other = {r.request.key: r.texts for r in ask(exact_client(tiny_model_dir, seed=4), *requests)}
    assert first == again == alone and first != other


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_continuous_batching_answers_as_each_request_alone(tiny_model_dir, batch_size):
    # Different lengths, limits and stop strings make rows leave at different steps, so waiting
    # rows join a running batch (padding it, or being padded) in every way.
    client = exact_client(tiny_model_dir, batch_size=batch_size)
    requests = [chat(str(i), p, temperature=0, max_tokens=3 + 4 * (i % 3), stop=("の",) if i == 3 else None)
                for i, p in enumerate(MIXED_PROMPTS)]
    requests.append(Request("raw", prompt="昔々、ある村に", temperature=0, max_tokens=9))
    answers = {r.request.key: r.texts[0] for r in ask(client, *requests)}
    assert answers == {r.key: reference_greedy(client, r) for r in requests}


def test_scored_prompts_go_in_length_groups_and_score_as_each_alone(tiny_model_dir, monkeypatch):
    # A judge's prompts: short English ones and long Japanese ones (many tokens a character), mixed.
    # Padded to the longest in one pass they would cost rows x 1,000 tokens; in length groups
    # within the budget, a long one goes alone or with its like.
    monkeypatch.setattr(batching, "CPU_TOKEN_BUDGET", 120)
    client = exact_client(tiny_model_dir, batch_size=8)
    texts = ["Score: 1-5?", "日本の四季について、それぞれの季節の特徴と代表的な行事を詳しく説明してください。" * 2,
             "Is this right?", "富士山の高さと、登山に適した季節を教えてください。" * 2, "Answer A or B.",
             "次の文章を英語に翻訳してください：猫は窓辺で昼寝をしています。"]
    requests = [Request(f"r{i}", prompt=text, max_tokens=1, top_logprobs=5, logprob_tokens=("1", "A"))
                for i, text in enumerate(texts)]
    shapes = []
    client.lm.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                        with_kwargs=True)
    together = {r.request.key: r.top_logprobs[0] for r in ask(client, *requests)}
    lengths = sorted((len(client.tokenizer(t)["input_ids"]) for t in texts), reverse=True)
    assert len(shapes) > 1 and sum(rows for rows, _ in shapes) == len(texts)
    assert all(rows == 1 or rows * width <= 120 for rows, width in shapes)
    assert sum(rows * width for rows, width in shapes) < len(texts) * lengths[0]  # less than one padded batch
    for request in requests:
        [alone] = ask(exact_client(tiny_model_dir, batch_size=1), request)
        assert together[request.key].keys() == alone.top_logprobs[0].keys()
        for token, logprob in alone.top_logprobs[0].items():
            assert together[request.key][token] == pytest.approx(logprob, abs=1e-4)


@pytest.mark.parametrize("peaked", [True, False])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_the_nucleus_is_the_one_a_full_sort_gives(peaked, top_p):
    # Peaked: the set lies among the first few hundred tokens; flat: it does not, and the
    # whole vocabulary is sorted.
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(49_152, generator=generator) * (8.0 if peaked else 0.5)
    probs = torch.softmax(logits, dim=-1)
    ordered, order = torch.sort(probs, descending=True)
    keep = (ordered.cumsum(dim=0) - ordered) < top_p
    kept, ids = local_backend.nucleus(probs, top_p)
    assert ids.tolist() == order[keep].tolist() and torch.equal(kept, ordered[keep])
    assert (len(ids) < local_backend.NUCLEUS_PEEK) == peaked


def test_the_nucleus_of_bf16_logits_holds_the_probabilities_a_full_sort_keeps():
    # A bf16 model's logits tie often: tied tokens may come in another order than a sort's, and
    # at the edge of the set one tied token may stand for another, but never a different probability.
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(49_152, generator=generator) * 6.0).to(torch.bfloat16).float()
    probs = torch.softmax(logits / 0.7, dim=-1)
    ordered, _ = torch.sort(probs, descending=True)
    for top_p in (0.5, 0.95):
        keep = (ordered.cumsum(dim=0) - ordered) < top_p
        kept, ids = local_backend.nucleus(probs, top_p)
        assert torch.equal(kept, ordered[keep]) and torch.equal(probs[ids], kept) and len(set(ids.tolist())) == len(ids)


def test_sampling_draws_tokens_as_often_as_their_share_of_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]))
    generator = torch.Generator().manual_seed(7)
    request = Request("r", prompt="x", temperature=1.0, top_p=0.85)  # keeps the first three
    draws = [local_backend._sample(logits, request, generator) for _ in range(6_000)]
    shares = [draws.count(token) / len(draws) for token in range(5)]
    for share, expected in zip(shares, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0, 0.0]):
        assert share == pytest.approx(expected, abs=0.02)
    everything = Request("r", prompt="x", temperature=1.0, top_p=1.0)
    draws = [local_backend._sample(logits, everything, generator) for _ in range(6_000)]
    assert draws.count(4) / len(draws) == pytest.approx(0.04, abs=0.01)


def test_an_empty_prompt_alone_starts_from_the_start_token(tiny_model_dir):
    # Alone, an empty prompt once gave a zero-width prefill (a reshape error); the model starts
    # from BOS (or EOS) as `model.generate` does. Generated and scored, and the same beside others.
    client = exact_client(tiny_model_dir, batch_size=4)
    [generated] = ask(client, Request("g", prompt="", temperature=0, max_tokens=3))
    [scored] = ask(client, Request("s", prompt="", max_tokens=1, top_logprobs=3))
    assert generated.error is None and generated.completion_tokens > 0 and len(scored.top_logprobs[0]) >= 3
    together = {r.request.key: r for r in ask(client, Request("g", prompt="", temperature=0, max_tokens=3),
                                               Request("x", prompt="日本語で", temperature=0, max_tokens=3))}
    assert together["g"].texts == generated.texts


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


def test_the_prompts_shared_start_is_prefilled_once(tiny_model_dir):
    # Chat prompts share the template's system prompt: it is computed once and reused by every
    # joiner, later single joiners included, and the answers stay those of each request alone.
    client = exact_client(tiny_model_dir, batch_size=2)
    widths = []  # (rows, tokens) of every forward pass that prefills
    client.lm.register_forward_hook(lambda module, args, kwargs, out: widths.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    requests = [chat("a", "こんにちは。", temperature=0, max_tokens=2), chat("b", "Say hi.", temperature=0, max_tokens=6),
                chat("c", "日本語で一文を書いてください。", temperature=0, max_tokens=4)]
    answers = {r.request.key: r.texts[0] for r in ask(client, *requests)}
    prefills = [shape for shape in widths if shape[1] > 1]
    shared = prefills[0][1]
    assert prefills[0][0] == 1 and shared >= local_backend.MIN_SHARED_PREFIX
    lengths = [len(client.tokenizer(client._render(r)[0], add_special_tokens=False)["input_ids"]) for r in requests]
    assert len(prefills) == 3  # the shared start, then the first two rows, then the third joining later
    assert all(tokens <= max(lengths) - shared for _, tokens in prefills[1:])
    assert answers == {r.key: reference_greedy(client, r) for r in requests}


def test_local_model_that_is_not_a_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--model"):
        local_client(tmp_path / "missing")


def test_threads_are_set_when_the_local_backend_opens(tiny_model_dir, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        client = local_client(tiny_model_dir)
        assert client.threads == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bf16_matmul", [True, False])
def test_precision_follows_the_cpu_and_is_named_in_provenance(tiny_model_dir, monkeypatch, bf16_matmul):
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: bf16_matmul)
    client = local_client(tiny_model_dir, batch_size=2)
    responses = ask(client, chat("ja", "日本の首都はどこですか？", temperature=0, max_tokens=6),
                    chat("en", "Name a colour.", temperature=0, max_tokens=6))
    if bf16_matmul:  # bf16 weights, matmuls, attention and KV cache: the fastest here (bench_local)
        assert client.precision == "bf16" and client.lm.dtype == torch.bfloat16 == client.cache_dtype
        assert client.lm.config._attn_implementation != FP32_ATTENTION
    else:
        assert client.precision == "fp32" and client.lm.dtype == torch.float32 == client.cache_dtype
    assert [r.precision for r in responses] == [client.precision] * 2
    assert all(r.error is None and r.completion_tokens > 0 for r in responses)


def test_an_explicit_precision_wins_over_the_cpu(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: True)
    assert exact_client(tiny_model_dir, dtype="fp32").precision == "fp32"
    plain = exact_client(tiny_model_dir, dtype="bf16")
    assert plain.precision == "bf16" and plain.cache_dtype == torch.bfloat16
    mixed = exact_client(tiny_model_dir, dtype=models.BF16_FP32_ATTENTION)
    assert mixed.precision == BF16_FP32_ATTENTION_NAME and mixed.cache_dtype == torch.float32
    assert mixed.lm.config._attn_implementation == FP32_ATTENTION
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: False)
    assert exact_client(tiny_model_dir, dtype=models.BF16_FP32_ATTENTION).precision == BF16_FP32_ATTENTION_NAME


def generated_tokens(client, requests) -> dict[str, list[int]]:
    """The token ids each request's greedy answer kept, as the client generated them (batched)."""
    kept, finish = {}, client._finish

    def spy(tokens, request, reason, count):
        kept[request.key] = list(tokens)
        return finish(tokens, request, reason, count)

    client._finish = spy
    ask(client, *requests)
    return kept


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", models.BF16_FP32_ATTENTION])
def test_bf16_decodes_what_fp32_would_choose(precision):
    """Teacher forcing: fed each prompt and the answer the bf16 path generated (batched, through
    its KV cache), fp32 picks the same next token at almost every position. Measured 98-99% on
    real answers (bench/bench_local.py); attention on the wrong positions or values falls far
    below the bound."""
    mixed = exact_client("SmolLM2-135M-Instruct", dtype=precision, batch_size=3)
    reference = exact_client("SmolLM2-135M-Instruct", dtype="fp32")
    prompts = ["日本の首都はどこですか？一文で答えてください。", "Explain what a hash table is.",
               "Give three tips for staying healthy.", "富士山について短く説明してください。"]
    requests = [chat(str(i), p, temperature=0, max_tokens=24) for i, p in enumerate(prompts)]
    answers = generated_tokens(mixed, requests)
    same = total = 0
    for request in requests:
        answer = answers[request.key]
        text, templated = reference._render(request)
        prompt = reference.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        with torch.inference_mode():
            logits = reference.lm(input_ids=torch.tensor([prompt + answer])).logits[0]
        choices = logits[len(prompt) - 1:-1].argmax(dim=-1).tolist()  # position t predicts token t + 1
        same += sum(a == b for a, b in zip(choices, answer))
        total += len(answer)
    assert total > 40 and same / total >= 0.9


@pytest.mark.slow
def test_local_answers_with_the_embedded_model():
    client = local_client("SmolLM2-135M-Instruct")
    [response] = ask(client, chat("a", "What is the capital of France?", temperature=0, max_tokens=12))
    assert response.error is None and response.model == "SmolLM2-135M-Instruct"
    assert "Paris" in response.texts[0]
    assert response.prompt_tokens > 5 and 0 < response.completion_tokens <= 12


@pytest.mark.slow
def test_embedded_model_batched_answers_equal_each_alone():
    client = exact_client("SmolLM2-135M-Instruct", batch_size=3)
    requests = [chat("ja", "日本の首都はどこですか？", temperature=0, max_tokens=16),
                chat("stop", "Name three fruits.", temperature=0, max_tokens=24, stop=("\n",)),
                chat("long", "Explain what a hash table is.", temperature=0, max_tokens=20),
                chat("short", "Say yes.", temperature=0, max_tokens=4)]
    answers = {r.request.key: r.texts[0] for r in ask(client, *requests)}
    assert answers == {r.key: reference_greedy(client, r) for r in requests}
