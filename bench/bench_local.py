"""Benchmark: tokens per second of the embedded model on CPU, batched (16) against one at a time.

The `local` backend generates 64 new tokens (greedy) for 16 real Alpaca instructions, once
with `batch_size` 16 (left padding, requests sorted by length) and once with batch size 1,
which is how a plain `model.generate` loop over prompts runs. The last line is the ratio of
completion tokens per second.

    python bench/bench_local.py [--requests 16] [--max-tokens 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backends import BackendOptions, Request, make_client  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"
# Used when the shared Alpaca sample is absent (it is not part of the product).
FALLBACK_INSTRUCTIONS = [
    "Give three tips for staying healthy.", "Describe the water cycle in simple words.",
    "Write a haiku about autumn.", "Explain what a hash table is.", "Name the planets of the solar system.",
    "Suggest a title for a blog post about saving money.", "Translate 'good morning' into French and Spanish.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


def instructions(n: int) -> list[str]:
    if ALPACA.exists():
        records = json.loads(ALPACA.read_text(encoding="utf-8"))
        texts = [r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "") for r in records]
    else:
        texts = FALLBACK_INSTRUCTIONS
    return [texts[i % len(texts)] for i in range(n)]


def tokens_per_second(batch_size: int, prompts: list[str], max_tokens: int, device: str) -> tuple[float, int, float]:
    client = make_client(BackendOptions(backend="local", batch_size=batch_size, device=device))
    requests = [Request(str(i), messages=({"role": "user", "content": p},), temperature=0, max_tokens=max_tokens)
                for i, p in enumerate(prompts)]
    start = time.perf_counter()
    tokens = sum(r.completion_tokens for r in client.stream(requests))
    elapsed = time.perf_counter() - start
    client.close()
    return tokens / elapsed, tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    prompts = instructions(args.requests)
    tokens_per_second(1, prompts[:1], 4, args.device)  # load and convert once, outside the timing
    rates = {}
    for batch_size in (args.batch_size, 1):
        rate, tokens, elapsed = tokens_per_second(batch_size, prompts, args.max_tokens, args.device)
        rates[batch_size] = rate
        print(f"batch {batch_size:>2}: {rate:7.1f} tokens/s ({tokens} tokens in {elapsed:.1f} s)", flush=True)
    print(f"batch {args.batch_size} vs batch 1: {rates[args.batch_size] / rates[1]:.1f}x")


if __name__ == "__main__":
    main()
