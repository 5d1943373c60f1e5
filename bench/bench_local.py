"""Benchmark: tokens per second of the embedded model on CPU, ours against transformers, batch 16 against 1.

All sides run in one process, taking turns, on the same 64 real Alpaca instructions,
generating up to 64 new tokens greedily, so they share whatever load the machine has:

- `transformers fp32, batch 16`: the reference, `model.generate` over batches of 16 prompts
  sorted by length (left padding), each batch waiting on its longest answer;
- `local <precision>, batch N`: the `local` backend (continuous batching, our decode loop) in
  each candidate precision (`--precisions`), and at batch 1 in the precision it picks itself.

It prints the threads torch used and the 1-minute load average before and after, the share of
greedy answers that differ from the reference (precision can change a near tie), and, last,
the two ratios of completion tokens per second.

    python bench/bench_local.py [--requests 64] [--rounds 2] [--max-tokens 64] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.backends import BackendOptions, Request  # noqa: E402
from pipeline.local_backend import LocalClient  # noqa: E402

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


def requests_for(prompts: list[str], max_tokens: int) -> list[Request]:
    return [Request(str(i), messages=({"role": "user", "content": p},), temperature=0, max_tokens=max_tokens)
            for i, p in enumerate(prompts)]


def run_local(client: LocalClient, batch_size: int, requests: list[Request]) -> tuple[int, float, dict[str, str]]:
    """Completion tokens, seconds and {key: text} of the local backend at `batch_size`."""
    client.options = BackendOptions(backend="local", batch_size=batch_size, device=client.options.device)
    start = time.perf_counter()
    responses = list(client.stream(requests))
    elapsed = time.perf_counter() - start
    return sum(r.completion_tokens for r in responses), elapsed, {r.request.key: r.texts[0] for r in responses}


def run_transformers(client: LocalClient, batch_size: int, requests: list[Request]) -> tuple[int, float, dict[str, str]]:
    """The reference: `model.generate` per batch of prompts sorted by length, on the client's model."""
    tokenizer, lm = client.tokenizer, client.lm
    texts = {r.key: client._render(r)[0] for r in requests}
    order = sorted(requests, key=lambda r: len(texts[r.key]))
    answers, tokens = {}, 0
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        encoded = tokenizer([texts[r.key] for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            output = lm.generate(**encoded, max_new_tokens=batch[0].max_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        for request, row in zip(batch, output[:, encoded["input_ids"].shape[1]:].tolist()):
            end = next((j for j, t in enumerate(row) if t in client._eos), None)
            tokens += len(row) if end is None else end + 1
            answers[request.key] = tokenizer.decode(row if end is None else row[:end], skip_special_tokens=True)
    return tokens, time.perf_counter() - start, answers


def changed(answers: dict[str, str], reference: dict[str, str]) -> str:
    return f"{sum(answers[k] != reference[k] for k in reference)}/{len(reference)} greedy answers differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="turns the sides take (each on its share of requests)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="local candidates measured at the batch size (bf16: 4.5x slower than fp32 without AMX)")
    args = parser.parse_args()
    requests = requests_for(instructions(args.requests), args.max_tokens)
    load_before = os.getloadavg()[0]
    options = BackendOptions(backend="local", batch_size=args.batch_size, device=args.device)
    auto = LocalClient(options)  # the backend's own choice: bf16 on CPUs with AMX, else fp32
    clients = {auto.precision: auto}
    for precision in args.precisions.split(","):
        clients.setdefault(precision, LocalClient(options, dtype=precision))
    print(f"threads: {auto.threads} (torch {torch.get_num_threads()}); load average before: {load_before:.2f}; "
          f"the backend's precision here: {auto.precision}", flush=True)
    for client in clients.values():  # warm up: first calls pay for allocations and kernel choices
        run_local(client, 2, requests[:2])
    big = args.batch_size
    reference_client = clients.get("fp32") or LocalClient(options, dtype="fp32")
    # The sides take turns round by round, so a machine whose load changes loads them alike.
    sides = {"transformers fp32": lambda part: run_transformers(reference_client, big, part)}
    sides.update({f"local {name}": (lambda part, c=client: run_local(c, big, part)) for name, client in clients.items()})
    sides[f"local {auto.precision} batch 1"] = lambda part: run_local(auto, 1, part)
    totals = {side: [0, 0.0, {}] for side in sides}  # tokens, seconds, answers
    per_round = -(-len(requests) // args.rounds)
    for start in range(0, len(requests), per_round):
        for side, run in sides.items():
            tokens, seconds, answers = run(requests[start:start + per_round])
            totals[side][0] += tokens
            totals[side][1] += seconds
            totals[side][2].update(answers)
    rates = {side: tokens / seconds for side, (tokens, seconds, _) in totals.items()}
    reference = totals["transformers fp32"][2]
    for side, rate in rates.items():
        print(f"{side:>22}: {rate:7.1f} tokens/s ({changed(totals[side][2], reference)})", flush=True)
    rate_ref, rate_one = rates.pop("transformers fp32"), rates.pop(f"local {auto.precision} batch 1")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    best = max(rates, key=rates.get)
    print(f"best {best} ({auto.engine}), batch {big}")
    print(f"best local vs transformers fp32, batch {big}: {rates[best] / rate_ref:.1f}x")
    print(f"batch {big} vs batch 1: {rates[f'local {auto.precision}'] / rate_one:.1f}x")


if __name__ == "__main__":
    main()
