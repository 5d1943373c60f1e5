"""Shared fixtures: a tiny random model with the embedded model's tokenizer, small JSONL files, and
rouge_score's own scorer over our tokens (the reference of the filter's and the index's scores).

Fixtures for one module stay in that module; only what several test modules share lives here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


class OurTokens:
    """rouge_score's tokenizer interface over ours, so its own scorer scores the tokens the index sees
    (its default tokenizer gives Japanese no tokens at all)."""

    def __init__(self, tokenizer: str):
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> list[str]:
        from pipeline.similarity import tokenize

        return tokenize(text, self.tokenizer)


def rouge_score_greedy(texts: list[str], scorer, threshold: float) -> list[tuple[bool, float, str | None]]:
    """Self-Instruct's greedy rule by rouge_score, text `t<i>` after text: per text, whether it is
    kept (its highest fmeasure against the kept ones before it is at most `threshold`), that
    highest fmeasure, and the first kept one with it."""
    kept: list[int] = []
    out = []
    for text in texts:
        scores = [scorer.score(texts[j], text)["rougeL"].fmeasure for j in kept]
        best = max(scores, default=0.0)
        out.append((best <= threshold, best, f"t{kept[scores.index(best)]}" if best > 0 else None))
        if best <= threshold:
            kept.append(len(out) - 1)
    return out


def rouge_score_best_earlier(texts: list[str], scorer) -> list[tuple[float, str | None]]:
    """Per text, rouge_score's highest fmeasure against every earlier text, and the first one with it."""
    out = []
    for p, text in enumerate(texts):
        scores = [scorer.score(texts[j], text)["rougeL"].fmeasure for j in range(p)]
        best = max(scores, default=0.0)
        out.append((best, f"t{scores.index(best)}") if best > 0 else (0.0, None))
    return out


@pytest.fixture(scope="session")
def embedded_tokenizer_dir() -> Path:
    """The converted embedded model's folder (converted once per machine, then cached)."""
    from pipeline.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat template, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def fake_openai():
    """A fake OpenAI-compatible server on a free 127.0.0.1 port, stopped after the test.

    Yields a `tests.fake_openai_server.FakeOpenAIServer`; its API:
    - `.base_url`: "http://127.0.0.1:PORT/v1", for `--base-url` / `BackendOptions(base_url=...)`.
    - `.answer = fn`: fn(request JSON dict) -> text, or a list of texts (one per choice, cycled to n).
    - `.finish_reason = "length"`: what every choice reports (default "stop").
    - `.latency = 0.1`: seconds before each answer.
    - `.faults = ["429", "500", "malformed", "drop", "hang", "401", ...]`: consumed one per
      completion request from the front (None in the list = answer normally); or
      `.fail_every = k` with `.fail_with = "500"` for every k-th request.
      429 carries `Retry-After: .retry_after` (default "1"); "hang" waits `.hang_seconds`.
    - `.requests`: completion requests received (faulty ones included); `.bodies`: their JSON.
    """
    from tests.fake_openai_server import FakeOpenAIServer

    server = FakeOpenAIServer().start()
    yield server
    server.stop()
