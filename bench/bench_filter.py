"""Benchmark the ROUGE-L near-duplicate filter against the anchors' method, then at scale.

    .venv/bin/python bench/bench_filter.py                      # 2,000 vs reference, then 50,000 and 1,000,000
    .venv/bin/python bench/bench_filter.py --sizes 50000 --reference-size 300   # quicker

1. Reference vs ours on the same `--reference-size` real instructions (Alpaca when
   ../shared/data/alpaca_5000.json exists, else recombined seeds): the reference is the
   Self-Instruct / Alpaca rule done the way they do it (rouge_score, greedy, sequential, every
   pool member scored), but in one process: the anchors start a new process pool per
   candidate, which on two cores only adds start-up cost, so this reference is faster than
   theirs and the ratio printed is conservative. Decisions are asserted identical.
2. Ours alone on synthetic sets of each `--sizes`: real instructions recombined (halves of two
   instructions joined) and perturbed (some words replaced from a long-tailed vocabulary of
   made-up words, as real corpora have names and topics), plus a known share of planted near
   duplicates (a copy of an earlier record with one word changed: ROUGE-L (m-1)/m >= 0.75 for
   four words or more). It prints seconds, pairs pruned and how many planted duplicates were
   caught; a planted copy of a kept record must always be caught, since the rule is exact.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.filter import Config, filter_instructions  # noqa: E402
from pipeline.seeds import DEFAULT_SEEDS, SeedTask, load_seeds  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"
THRESHOLD = 0.7  # the anchors' threshold
SEED_COUNT = 175  # Self-Instruct's seed set size, when seeds are taken from Alpaca
PLANTED_SHARE = 0.05  # 5% of each synthetic set are planted near-duplicates
# Made-up words for the long tail; real instruction sets have hundreds of thousands of rare tokens.
TAIL_VOCABULARY = 400_000
REPLACED_SHARE = 0.3  # share of a recombined instruction's words swapped for tail words
MIN_PLANT_WORDS = 4  # one changed word in four or more keeps ROUGE-L >= 0.75, above 0.7


def real_instructions() -> tuple[list[str], str]:
    if ALPACA.exists():
        return [r["instruction"] for r in json.loads(ALPACA.read_text(encoding="utf-8"))], "alpaca_5000"
    seeds = load_seeds(ROOT / DEFAULT_SEEDS)
    rng = random.Random(0)
    texts = [s.instruction for s in seeds]
    out = []
    while len(out) < 2 * SEED_COUNT + 2000:  # recombine halves of seed instructions
        a, b = rng.choice(texts).split(), rng.choice(texts).split()
        out.append(" ".join(a[: len(a) // 2] + b[len(b) // 2:]))
    return out, "recombined seeds"


def reference_filter(seeds: list[str], candidates: list[str]) -> list[bool]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = list(seeds)
    kept = []
    for text in candidates:
        best = max((scorer.score(other, text)["rougeL"].fmeasure for other in pool), default=0.0)
        kept.append(best <= THRESHOLD)
        if kept[-1]:
            pool.append(text)
    return kept


def seed_tasks(texts: list[str]) -> list[SeedTask]:
    return [SeedTask(f"seed_task_{i}", t, ()) for i, t in enumerate(texts)]


def tail_word(rng: random.Random) -> str:
    rank = int(rng.paretovariate(0.8)) % TAIL_VOCABULARY  # a long tail: few frequent, most rare
    return f"w{rank:x}q"


def synthetic(real: list[str], size: int, rng: random.Random) -> tuple[list[str], set[int], dict[int, int]]:
    """`size` instructions; returns them, the planted positions, and each planted one's source."""
    texts: list[str] = []
    planted: set[int] = set()
    source_of: dict[int, int] = {}
    for i in range(size):
        if texts and rng.random() < PLANTED_SHARE:
            j = rng.randrange(len(texts))
            words = texts[j].split()
            if len(words) >= MIN_PLANT_WORDS:
                words[rng.randrange(len(words))] = tail_word(rng)
                texts.append(" ".join(words))
                planted.add(i)
                source_of[i] = j
                continue
        a, b = rng.choice(real).split(), rng.choice(real).split()
        words = a[: max(1, len(a) // 2)] + b[len(b) // 2:]
        words = [tail_word(rng) if rng.random() < REPLACED_SHARE else w for w in words]
        texts.append(" ".join(words))
    return texts, planted, source_of


def run_ours(seeds: list[SeedTask], texts: list[str]):
    records = [{"id": f"m{i}", "instruction": t} for i, t in enumerate(texts)]
    cfg = Config(threshold=THRESHOLD, tokenizer="multilingual", heuristics=False, exact_scores_limit=0)
    started = time.perf_counter()
    kept, rejected, report = filter_instructions(records, seeds, cfg, progress=True)
    return time.perf_counter() - started, kept, rejected, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-size", type=int, default=2000, help="instructions in the reference comparison (0 skips it)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[50_000, 1_000_000], help="synthetic set sizes for ours alone")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    real, source = real_instructions()
    seed_texts = real[:SEED_COUNT]
    seeds = seed_tasks(seed_texts)
    print(f"data: {source}; {len(seeds)} seeds; threshold {THRESHOLD}")

    if args.reference_size:
        candidates = real[SEED_COUNT:SEED_COUNT + args.reference_size]
        started = time.perf_counter()
        expected = reference_filter(seed_texts, candidates)
        reference_s = time.perf_counter() - started
        ours_s, kept, _, _ = run_ours(seeds, candidates)
        kept_ids = {r["id"] for r in kept}
        got = [f"m{i}" in kept_ids for i in range(len(candidates))]
        assert got == expected, "decisions differ from the rouge_score reference"
        print(f"reference (rouge_score, sequential): {len(candidates):,} instructions in {reference_s:.1f} s")
        print(f"ours:                               {len(candidates):,} instructions in {ours_s:.3f} s"
              f"  -> {reference_s / ours_s:,.0f}x faster, identical decisions ({sum(got):,} kept)")

    rng = random.Random(args.seed)
    for size in args.sizes:
        texts, planted, source_of = synthetic(real[SEED_COUNT:], size, rng)
        seconds, kept, rejected, report = run_ours(seeds, texts)
        kept_ids = {r["id"] for r in kept}
        caught = sum(f"m{i}" not in kept_ids for i in planted)
        must = [i for i in planted if f"m{source_of[i]}" in kept_ids]  # their source is in the pool
        missed = [i for i in must if f"m{i}" in kept_ids]
        pairs = report["pairs"]
        print(f"ours: {size:>9,} instructions in {seconds:7.1f} s  ({size / seconds:,.0f}/s); kept {len(kept):,}; "
              f"pairs {pairs['possible']:,} possible, {pairs['compared']:,} compared "
              f"({pairs['pruned'] / max(pairs['possible'], 1):.4%} pruned); "
              f"planted duplicates caught {caught:,}/{len(planted):,} (missed with source kept: {len(missed)})")
        assert not missed, "a planted duplicate of a kept record was kept"


if __name__ == "__main__":
    main()
