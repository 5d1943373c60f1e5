"""Benchmark: tokens per second of the embedded model on CPU, ours against transformers, batch 16 against 1.

All sides run in one process, taking turns, on the same 64 real Alpaca instructions,
generating up to 64 new tokens greedily, so they share whatever load the machine has:

- `transformers fp32, batch 16`: the reference, `model.generate` over batches of 16 prompts
  sorted by length (left padding), each batch waiting on its longest answer;
- `local <precision>, batch N`: the `local` backend (continuous batching, our decode loop) in
  each candidate precision (`--precisions`: fp32; bf16 throughout; bf16 weights with attention
  and KV cache in fp32, pipeline/cpu_attention.py), and at batch 1 in the precision it picks itself.

It prints the threads torch used and the 1-minute load average before and after; for each
precision, the share of greedy answers that differ from the reference (one changed token
changes the rest of an answer, so this overstates the difference) and the teacher-forced top-1
agreement with fp32 (fed the reference answers, the share of answer positions where the
precision's most likely next token is fp32's); and, last, the two ratios of completion tokens
per second.

    python bench/bench_local.py [--requests 64] [--rounds 2] [--max-tokens 64] [--threads N]
                                [--precisions fp32,bf16,bf16-fp32-attention]
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
from pipeline.models import free_cores  # noqa: E402

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


def forced_choices(client: LocalClient, requests: list[Request], answers: dict[str, str], batch_size: int = 8) -> list[int]:
    """Teacher forcing: fed each prompt and its reference answer, the most likely token at every answer
    position (and after its end), in one forward pass per batch of left-padded sequences."""
    tokenizer, lm, pad = client.tokenizer, client.lm, client.tokenizer.pad_token_id
    pairs = []
    for request in requests:
        text, templated = client._render(request)
        pairs.append((tokenizer(text, add_special_tokens=not templated)["input_ids"],
                      tokenizer(answers[request.key], add_special_tokens=False)["input_ids"]))
    choices = []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        width = max(len(prompt) + len(answer) for prompt, answer in part)
        keep = max(len(answer) for _, answer in part) + 1  # left padding: every answer ends at the last position
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for j, (prompt, answer) in enumerate(part):
            ids[j, width - len(prompt) - len(answer):] = torch.tensor(prompt + answer)
            mask[j, width - len(prompt) - len(answer):] = 1
        with torch.inference_mode():
            logits = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                        logits_to_keep=keep).logits
        top = logits.float().argmax(dim=-1)
        for j, (_, answer) in enumerate(part):  # position t predicts token t + 1
            choices += top[j, keep - len(answer) - 1:].tolist()
    return choices


def agreement(choices: list[int], reference: list[int]) -> str:
    same = sum(a == b for a, b in zip(choices, reference))
    return f"teacher-forced top-1 agreement with fp32 {same / len(reference):.1%} of {len(reference)} tokens"


def open_clients(args) -> tuple[LocalClient, dict[str, LocalClient]]:
    """The backend's own choice, and a client per candidate precision, keyed by the precision's name."""
    options = BackendOptions(backend="local", batch_size=args.batch_size, device=args.device)
    clients = {}
    for precision in dict.fromkeys(["fp32"] + args.precisions.split(",")):
        client = LocalClient(options, dtype=precision)
        clients.setdefault(client.precision, client)
    auto = LocalClient(options)  # bf16 on CPUs with bf16 matmul units, else fp32
    return clients.setdefault(auto.precision, auto), clients


def take_turns(sides: dict, requests: list[Request], rounds: int) -> dict[str, list]:
    """{side: [tokens, seconds, answers]}: the sides take turns round by round, so a machine
    whose load changes loads them alike."""
    totals = {side: [0, 0.0, {}] for side in sides}
    per_round = -(-len(requests) // rounds)
    for start in range(0, len(requests), per_round):
        for side, run in sides.items():
            tokens, seconds, answers = run(requests[start:start + per_round])
            totals[side][0] += tokens
            totals[side][1] += seconds
            totals[side][2].update(answers)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="turns the sides take (each on its share of requests)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: the free cores, pipeline.models.free_cores; OMP_NUM_THREADS wins)")
    parser.add_argument("--precisions", default="fp32,bf16,bf16-fp32-attention", help="local candidates at the batch size")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    # One thread count for every side, read by each client's free_cores() as it opens.
    os.environ["OMP_NUM_THREADS"] = str(args.threads or free_cores())
    requests = requests_for(instructions(args.requests), args.max_tokens)
    auto, clients = open_clients(args)
    print(f"threads: {auto.threads} (torch {torch.get_num_threads()}); load average before: {load_before:.2f}; "
          f"the backend's precision here: {auto.precision}", flush=True)
    for client in clients.values():  # warm up: first calls pay for allocations and kernel choices
        run_local(client, 2, requests[:2])
    run_transformers(clients["fp32"], 2, requests[:2])
    big = args.batch_size
    sides = {"transformers fp32": lambda part: run_transformers(clients["fp32"], big, part)}
    sides.update({f"local {name}": (lambda part, c=client: run_local(c, big, part)) for name, client in clients.items()})
    sides[f"local {auto.precision} batch 1"] = lambda part: run_local(auto, 1, part)
    totals = take_turns(sides, requests, args.rounds)
    rates = {side: tokens / seconds for side, (tokens, seconds, _) in totals.items()}
    reference = totals["transformers fp32"][2]
    forced = {name: forced_choices(client, requests, reference) for name, client in clients.items()}
    for side, rate in rates.items():
        name = side.removeprefix("local ").removesuffix(" batch 1")
        quality = f"; {agreement(forced[name], forced['fp32'])}" if side.startswith("local ") and name in forced else ""
        print(f"{side:>34}: {rate:7.1f} tokens/s ({changed(totals[side][2], reference)}{quality})", flush=True)
    rate_ref, rate_one = rates.pop("transformers fp32"), rates.pop(f"local {auto.precision} batch 1")
    print(f"load average after: {os.getloadavg()[0]:.2f}; threads: {torch.get_num_threads()}")
    best = max(rates, key=rates.get)
    print(f"best: {best} ({auto.engine}), batch {big}")
    print(f"best local vs transformers fp32, batch {big}: {rates[best] / rate_ref:.1f}x")
    print(f"batch {big} vs batch 1: {rates[f'local {auto.precision}'] / rate_one:.1f}x")


if __name__ == "__main__":
    main()
