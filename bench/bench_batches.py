"""Benchmark: what padding and whole-vocabulary sampling cost the local backend on a CPU, and what avoids them.

Both parts run the embedded model in the precision the backend picks, in one process, the two
sides taking turns (`--rounds`), so they share whatever load the machine has:

1. Judge scoring: pairwise judge prompts (probability scoring, both orders) built from seed
   tasks, half English and half Japanese, each task's own answer against its first half, with
   the reference shown, so a Japanese prompt runs to several hundred tokens more than an English
   one. The reference side is the backend before `batching.length_groups`: each batch of
   `--batch-size` prompts padded to its longest; ours is `LocalClient._next_token` (length groups
   within `batching.CPU_TOKEN_BUDGET` padded tokens). It counts the prompts whose most likely
   verdict letter is the same on both sides (bf16 may flip a near tie).
2. Top-p sampling: next-token logits of the embedded model at real answer positions; the
   reference is a sort of the whole vocabulary and `torch.multinomial` (the backend before
   `local_backend.nucleus`), ours `local_backend._sample`. Every row's top-p set must be the
   one the full sort gives.

It prints the threads torch used and the load average before and after, and ends with

    length groups vs one padded batch, judge scoring: N.Nx
    top-p sampling, nucleus from the top 256 vs full sort: N.Nx

    python bench/bench_batches.py [--tasks 16] [--rounds 2] [--positions 512] [--top-p 0.95]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline import batching, judging, local_backend  # noqa: E402
from pipeline.backends import BackendOptions, Request  # noqa: E402
from pipeline.local_backend import LocalClient  # noqa: E402
from pipeline.models import free_cores  # noqa: E402
from pipeline.seeds import load_seeds  # noqa: E402

SEEDS = ROOT / "seeds" / "seed_tasks.jsonl"


def judge_requests(tasks: int) -> list[Request]:
    """Pairwise probability-scoring requests, both orders, for `tasks` seed tasks (half Japanese)."""
    seeds = [s for s in load_seeds(SEEDS) if s.instances and s.instances[0].output.strip()]
    chosen = [s for s in seeds if s.language == "en"][:tasks // 2] + [s for s in seeds if s.language == "ja"][:tasks - tasks // 2]
    settings = judging.JudgeSettings(scoring="probs")
    requests = []
    for task in chosen:
        instance = task.instances[0]
        answer = instance.output.strip()
        pair = judging.Pair(task.id, task.instruction, answer, answer[:max(1, len(answer) // 2)], instance.input,
                            answer, task.language)
        rubric = judging.load_rubric("pairwise", task.language)
        for order, (first, second) in (("ab", (pair.answer_a, pair.answer_b)), ("ba", (pair.answer_b, pair.answer_a))):
            text = judging.pairwise_prompt(pair, first, second, settings, rubric)
            requests.append(judging._request(f"{task.language}/{task.id}/{order}", text, settings, "pairwise",
                                             judging.LETTERS))
    return requests


def one_padded_batch(client: LocalClient, items: list, batch_size: int) -> list:
    """The reference: each `batch_size` prompts padded to their longest, one forward pass each."""
    responses = []
    for start in range(0, len(items), batch_size):
        part = items[start:start + batch_size]
        encoded = client.tokenizer([text for _, text, _ in part], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(client.lm.device)
        responses += client._score(part, encoded)
    return responses


def time_scoring(client: LocalClient, requests: list[Request], batch_size: int, rounds: int) -> tuple[float, float]:
    items = [(request, *client._render(request)) for request in requests]
    assert all(templated for _, _, templated in items)  # the embedded model has a chat template
    lengths = [len(client.tokenizer(text, add_special_tokens=False)["input_ids"]) for _, text, _ in items]
    by_language: dict[str, list[int]] = {}
    for request, length in zip(requests, lengths):
        by_language.setdefault(request.key.split("/", 1)[0], []).append(length)
    print(f"judge prompts: {len(items)} ({', '.join(f'{k} {len(v)}, {min(v)}-{max(v)} tokens' for k, v in by_language.items())}); "
          f"batch {batch_size}, padded-token budget {batching.CPU_TOKEN_BUDGET:,}", flush=True)
    reference_s = ours_s = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        reference = one_padded_batch(client, items, batch_size)
        reference_s += time.perf_counter() - started
        started = time.perf_counter()
        ours = [r for start in range(0, len(items), batch_size) for r in client._next_token(items[start:start + batch_size])]
        ours_s += time.perf_counter() - started
    # bf16 rounds differently with a batch's shape, so a near tie may flip: counted, not asserted.
    letters = {r.request.key: r.texts[0] for r in reference}
    same = sum(letters[r.request.key] == r.texts[0] for r in ours)
    print(f"  one padded batch: {reference_s / rounds:6.2f} s a round; length groups: {ours_s / rounds:6.2f} s; "
          f"the same most likely letter for {same} of {len(ours)} prompts", flush=True)
    return reference_s, ours_s


def answer_logits(client: LocalClient, positions: int) -> torch.Tensor:
    """The model's next-token logits at `positions` answer positions of seed instances (teacher-forced)."""
    rows = []
    with torch.inference_mode():
        for task in load_seeds(SEEDS):
            for instance in task.instances:
                text = client._render(Request("x", messages=({"role": "user", "content": task.instruction},)))[0]
                ids = client.tokenizer(text + instance.output, return_tensors="pt", add_special_tokens=False)
                logits = client.lm(**ids).logits[0].float()
                rows.append(logits[-min(len(logits), 64):])
                if sum(len(r) for r in rows) >= positions:
                    return torch.cat(rows)[:positions]
    return torch.cat(rows)


def full_sort_sample(logits: torch.Tensor, request: Request, generator: torch.Generator) -> int:
    """The reference: the backend's sampler before `nucleus` (a whole-vocabulary sort, multinomial)."""
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = (sorted_probs.cumsum(dim=0) - sorted_probs) < request.top_p
    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def time_sampling(logits: torch.Tensor, temperature: float, top_p: float, rounds: int) -> tuple[float, float]:
    request = Request("x", prompt="x", temperature=temperature, top_p=top_p)
    widths = []
    for row in logits:  # the same set as a full sort, row by row
        probs = torch.softmax(row / temperature, dim=-1)
        ordered, order = torch.sort(probs, descending=True)
        keep = (ordered.cumsum(dim=0) - ordered) < top_p
        kept, ids = local_backend.nucleus(probs, top_p)
        # bf16 logits tie often: tied tokens may come in another order, so the probabilities are compared.
        assert torch.equal(kept, ordered[keep]), "the nucleus differs from the full sort's"
        widths.append(len(ids))
    reference_s = ours_s = 0.0
    for _ in range(rounds):
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        for row in logits:
            full_sort_sample(row, request, generator)
        reference_s += time.perf_counter() - started
        started = time.perf_counter()
        for row in logits:
            local_backend._sample(row, request, generator)
        ours_s += time.perf_counter() - started
    beyond = sum(w >= local_backend.NUCLEUS_PEEK for w in widths)
    print(f"sampling: {len(logits)} answer positions, temperature {temperature}, top_p {top_p}: top-p sets of "
          f"{min(widths)}-{max(widths)} tokens (median {sorted(widths)[len(widths) // 2]}; {beyond} needed the full sort, "
          f"every set the full sort's)")
    print(f"  full sort + multinomial: {reference_s / rounds / len(logits) * 1e3:.3f} ms a token; "
          f"ours: {ours_s / rounds / len(logits) * 1e3:.3f} ms a token", flush=True)
    return reference_s, ours_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=16, help="seed tasks to judge (half English, half Japanese)")
    parser.add_argument("--batch-size", type=int, default=16, help="the backend's batch size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--positions", type=int, default=512, help="answer positions to sample at")
    parser.add_argument("--temperature", type=float, default=0.7, help="generate's default")
    parser.add_argument("--top-p", type=float, default=0.95, help="generate's default")
    args = parser.parse_args()

    client = LocalClient(BackendOptions(backend="local", device="cpu", batch_size=args.batch_size))
    print(f"threads: {torch.get_num_threads()} (free cores {free_cores()}); load average before: "
          f"{os.getloadavg()[0]:.2f}; precision {client.precision}", flush=True)
    scoring = time_scoring(client, judge_requests(args.tasks), args.batch_size, args.rounds)
    sampling = time_sampling(answer_logits(client, args.positions), args.temperature, args.top_p, args.rounds)
    print(f"load average after: {os.getloadavg()[0]:.2f}; threads: {torch.get_num_threads()}")
    print(f"length groups vs one padded batch, judge scoring: {scoring[0] / scoring[1]:.1f}x")
    print(f"top-p sampling, nucleus from the top 256 vs full sort: {sampling[0] / sampling[1]:.1f}x")


if __name__ == "__main__":
    main()
