"""Benchmark: how often the configured judge prefers the right answer, on a labelled set.

`tests/fixtures/judge_set.jsonl` holds 44 tasks (24 English, 20 Japanese), each with a correct
answer (`good`) and a wrong or weak one (`bad`, `flaw` says which). For the judge given by the
flags it prints, overall and per language:

- pointwise: the share of tasks whose good answer scores strictly higher than the bad one
  (ties are counted, and are not wins), and the mean score of each;
- pairwise (both orders, `pipeline.judging.pairwise_verdicts`): the share of verdicts picking
  the good answer, the bad one, or a tie, and the flip rate: the share of pairs whose preferred
  answer changed with the order (position bias; flips count as ties, never as wins).

A judge that scores at random gets 50% pointwise with probability scores (40% with integer
scores, where a fifth of the pairs tie); a good judge gets well over 90% pointwise and
pairwise, with few flips.

    python bench/bench_judge.py                                   # the embedded model, probability scoring
    python bench/bench_judge.py --limit 10                        # the first 10 tasks of each language
    python bench/bench_judge.py --backend openai --model gpt-4o-mini --scoring text
    python bench/bench_judge.py --backend openai --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import judging  # noqa: E402
from pipeline.backends import BackendOptions, open_client  # noqa: E402

JUDGE_SET = ROOT / "tests" / "fixtures" / "judge_set.jsonl"


def load_set(limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in JUDGE_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit is None:
        return rows
    by_language: dict[str, list[dict]] = {}
    for row in rows:
        by_language.setdefault(row["language"], []).append(row)
    return [row for group in by_language.values() for row in group[:limit]]


def pointwise(client, rows: list[dict], settings: judging.JudgeSettings) -> dict[str, dict[str, float | None]]:
    items = [judging.JudgeItem(f"{row['id']}:{side}", row["instruction"], row[side], row["input"], language=row["language"])
             for row in rows for side in ("good", "bad")]
    scores = {item.key: judgement.score for item, judgement in judging.judge_items(client, items, settings)}
    return {row["id"]: {"good": scores.get(f"{row['id']}:good"), "bad": scores.get(f"{row['id']}:bad")} for row in rows}


def pairwise(client, rows: list[dict], settings: judging.JudgeSettings) -> dict[str, judging.Verdict]:
    pairs = [judging.Pair(row["id"], row["instruction"], row["good"], row["bad"], row["input"], language=row["language"])
             for row in rows]
    return {pair.key: verdict for pair, verdict in judging.pairwise_verdicts(client, pairs, settings)}


def share(count: int, total: int) -> str:
    return f"{count / total:6.1%}" if total else "     -"


def report(name: str, rows: list[dict], points: dict, verdicts: dict) -> str:
    scored = [points[r["id"]] for r in rows if None not in points[r["id"]].values()]
    higher = sum(p["good"] > p["bad"] for p in scored)
    tied = sum(p["good"] == p["bad"] for p in scored)
    mean = lambda side: statistics.fmean(p[side] for p in scored) if scored else float("nan")  # noqa: E731
    read = [verdicts[r["id"]] for r in rows if r["id"] in verdicts and verdicts[r["id"]].winner is not None]
    wins = {w: sum(v.winner == w for v in read) for w in ("a", "b", "tie")}
    flips = sum(v.flipped for v in read)
    # With probabilities, the average P(good) over both orders cancels a constant position bias
    # (balanced position calibration, Wang et al. 2023): the signal a flip-is-a-tie rule discards.
    calibrated = [statistics.fmean(v.p_a) for v in read if None not in v.p_a]
    balanced = (f", P(good) averaged over both orders > 0.5 in {share(sum(p > 0.5 for p in calibrated), len(calibrated))}"
                if calibrated else "")
    return (f"{name:<4} n={len(rows):<3} pointwise: good higher {share(higher, len(scored))}, tie {share(tied, len(scored))} "
            f"(mean good {mean('good'):.2f}, bad {mean('bad'):.2f}; {len(rows) - len(scored)} unscored) | "
            f"pairwise: picks good {share(wins['a'], len(read))}, bad {share(wins['b'], len(read))}, "
            f"tie {share(wins['tie'], len(read))}, flip rate {share(flips, len(read))}{balanced} "
            f"({len(rows) - len(read)} unread)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="local", choices=("local", "openai"))
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--scoring", default="auto", choices=("auto", "text", "probs"),
                        help="auto: probs on local, text on openai")
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks of each language")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    scoring = args.scoring if args.scoring != "auto" else ("probs" if args.backend == "local" else "text")
    rows = load_set(args.limit)
    options = BackendOptions(backend=args.backend, model=args.model, base_url=args.base_url, concurrency=args.concurrency,
                             batch_size=args.batch_size, device=args.device, cache=False)
    settings = judging.JudgeSettings(scoring=scoring)
    started = time.monotonic()
    client = open_client(options)
    try:
        points = pointwise(client, rows, settings)
        verdicts = pairwise(client, rows, settings)
    finally:
        client.close()
    seconds = time.monotonic() - started
    print(f"judge {args.backend}:{args.model}, {scoring} scoring, {len(rows)} tasks from {JUDGE_SET.name}, "
          f"{seconds:.0f} s ({client.totals.requests} requests)")
    print(report("all", rows, points, verdicts))
    for language in ("en", "ja"):
        print(report(language, [r for r in rows if r["language"] == language], points, verdicts))


if __name__ == "__main__":
    main()
