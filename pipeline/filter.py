"""Drop near-duplicate instructions by ROUGE-L against the seeds and each other (Self-Instruct, step 2).

    python -m pipeline filter --in data/machine_instructions.jsonl --seeds seeds/seed_tasks.jsonl \\
        --out data/filtered_instructions.jsonl --report data/filter_report.json --threshold 0.7

The decision rule is the Self-Instruct / Alpaca one: the seeds start the pool; in input order,
a candidate is dropped if its highest ROUGE-L F1 (beta 1, no stemming) against the pool is
above `--threshold`, else it joins the pool at once. `pipeline.similarity.RougeIndex` makes that
exact and fast (prefix, length, positional and bag-overlap bounds in numpy, then blocks of pairs
in rapidfuzz's C++ for the exact LCS).
Before it, named heuristics drop what a text-only model cannot use (`--no-heuristics` turns
them off). No check rejects non-ASCII text.

Reason codes (in `<out>.rejected.jsonl` and the report):
`too_short`, `too_long` (words for space-separated text, characters for Japanese),
`blacklist` (needs images, files, audio...), `program_prefix` ("Write a program..."),
`punctuation_start`, `seed_copy` (the same text as a seed after normalisation),
`near_duplicate` (ROUGE-L above the threshold).

Kept records keep every input field and add `max_rouge_l` and `most_similar` ({id,
instruction}): the highest ROUGE-L against the pool when the record was decided (the seeds and
the earlier kept ones). It is exact when the pool is at most `--exact-scores-limit` records;
above that it is exact above the threshold and a lower bound below it (the report says which).
"""

from __future__ import annotations

import re
import string
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import option, write_resolved_config
from pipeline.errors import InputError, UserError
from pipeline.jsonl import (INSTRUCTION_FIELDS, check_output_path, read_records, rejected_path_for, write_json_atomic,
                            write_jsonl_atomic)
from pipeline.lang import language_of, text_length
from pipeline.seeds import SeedTask, load_seeds
from pipeline.similarity import RougeIndex

# Self-Instruct / Alpaca keep instructions of 4..150 words: shorter ones are rarely a whole
# task, longer ones rarely a single task.
MIN_WORDS = 3  # too short when at most this many words
MAX_WORDS = 150
# Japanese has no spaces; about two characters make a word, so the same limits in characters.
MIN_CHARS_JA = 6
MAX_CHARS_JA = 300

# Tasks a text-only model cannot do (Alpaca's list). English words match whole words, any case.
BLACKLIST_EN = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
# Japanese has no word boundaries, so these match as substrings; bare 図 (and 図を) is not listed:
# it is also inside 意図 (intent, 意図を...) and 図書館 (library).
BLACKLIST_JA = ("画像", "写真", "図を描", "図を作", "図示", "図表", "図解", "地図", "グラフ", "動画", "ビデオ", "音声", "音楽",
                "ファイル", "フローチャート", "ダイアグラム", "描いて", "描く", "プロット")
PROGRAM_PREFIXES = ("write a program", "プログラムを書")

REASONS = ("too_short", "too_long", "blacklist", "program_prefix", "punctuation_start", "seed_copy", "near_duplicate")

# Histogram of the kept records' highest ROUGE-L (Self-Instruct, Figure 3): ten bins over [0, 1].
HISTOGRAM_BINS = 10
# Exact highest scores for every kept record need all (record, earlier record) pairs: about
# 12M pairs for a 5,000-record pool, two or three seconds on two cores.
EXACT_SCORES_LIMIT = 5_000

_BLACKLIST_EN_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in BLACKLIST_EN) + r")\b", re.IGNORECASE)
_SPACES_RE = re.compile(r"\s+")
# Opening quotes and brackets may start a real instruction (「猫」を英訳して); other punctuation not.
_ALLOWED_OPENING = ("Ps", "Pi")


@dataclass(frozen=True)
class HeuristicOptions:
    """Limits of the heuristic checks; `enabled=False` skips them all."""

    enabled: bool = True
    min_words: int = MIN_WORDS
    max_words: int = MAX_WORDS
    min_chars_ja: int = MIN_CHARS_JA
    max_chars_ja: int = MAX_CHARS_JA


def normalize_instruction(text: str) -> str:
    """The form used to compare with seeds: NFKC, case-folded, whitespace collapsed."""
    return _SPACES_RE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def heuristic_reason(text: str, seed_instructions: set[str], options: HeuristicOptions) -> str | None:
    """The first heuristic that rejects `text` (a reason code from REASONS), or None.

    `seed_instructions` holds the seeds' instructions passed through `normalize_instruction`.
    """
    if not options.enabled:
        return None
    text = text.strip()
    if not text:
        return "too_short"
    japanese = not text.isascii() and language_of(text) == "ja"
    length = text_length(text) if japanese else len(text.split())
    low, high = (options.min_chars_ja, options.max_chars_ja) if japanese else (options.min_words, options.max_words)
    if length <= low:
        return "too_short"
    if length > high:
        return "too_long"
    normalized = normalize_instruction(text)
    if _BLACKLIST_EN_RE.search(text) or any(word in normalized for word in BLACKLIST_JA):
        return "blacklist"
    if normalized.startswith(PROGRAM_PREFIXES):
        return "program_prefix"
    first = text[0]
    if first in string.punctuation or (unicodedata.category(first).startswith("P")
                                       and unicodedata.category(first) not in _ALLOWED_OPENING):
        return "punctuation_start"
    if normalized in seed_instructions:
        return "seed_copy"
    return None


@dataclass(frozen=True)
class Config:
    in_path: str = option("data/machine_instructions.jsonl", "generated instructions to filter", flag="--in")
    seeds: str = option("seeds/seed_tasks.jsonl", "seed tasks; they start the pool")
    out: str = option("data/filtered_instructions.jsonl", "the kept instructions (rejected ones go to <out stem>.rejected.jsonl)")
    report: str | None = option(None, "JSON report: counts by reason, score histogram, timing (default: <out stem>.report.json)")
    threshold: float = option(0.7, "drop a candidate whose highest ROUGE-L F1 against the pool is above this")
    tokenizer: Literal["multilingual", "rouge"] = option(
        "multilingual", "ROUGE-L tokens: rouge_score's exact tokenizer, or the same on ASCII plus one token per CJK character")
    heuristics: bool = option(True, "apply the length, blacklist, prefix, punctuation and seed-copy checks")
    min_words: int = option(MIN_WORDS, "too_short: at most this many words")
    max_words: int = option(MAX_WORDS, "too_long: more than this many words")
    min_chars_ja: int = option(MIN_CHARS_JA, "too_short for Japanese: at most this many characters")
    max_chars_ja: int = option(MAX_CHARS_JA, "too_long for Japanese: more than this many characters")
    exact_scores_limit: int = option(EXACT_SCORES_LIMIT, "compute every kept record's exact highest ROUGE-L when the pool is at most this big")

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold: must be within [0, 1], got {self.threshold}")
        if self.min_words < 0 or self.max_words <= self.min_words:
            raise UserError(f"--min-words/--max-words: need 0 <= min < max, got {self.min_words} and {self.max_words}")
        if self.min_chars_ja < 0 or self.max_chars_ja <= self.min_chars_ja:
            raise UserError(f"--min-chars-ja/--max-chars-ja: need 0 <= min < max, got {self.min_chars_ja} and {self.max_chars_ja}")
        if self.exact_scores_limit < 0:
            raise UserError(f"--exact-scores-limit: must be >= 0, got {self.exact_scores_limit}")

    @property
    def heuristic_options(self) -> HeuristicOptions:
        return HeuristicOptions(self.heuristics, self.min_words, self.max_words, self.min_chars_ja, self.max_chars_ja)


@dataclass
class Stats:
    read: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    report: dict = field(default_factory=dict)


def report_path_for(out) -> Path:
    out = Path(out)
    return out.with_name(out.name.rsplit(".", 1)[0] + ".report.json")


def _histogram(scores: list[float]) -> dict:
    edges = [round(i / HISTOGRAM_BINS, 10) for i in range(HISTOGRAM_BINS + 1)]
    counts = [0] * HISTOGRAM_BINS
    for score in scores:
        counts[min(int(score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    return {"edges": edges, "counts": counts}


def filter_instructions(candidates: list[dict], seeds: list[SeedTask], cfg: Config,
                        progress: bool = False) -> tuple[list[dict], list[dict], dict]:
    """The stage's pure core: `(kept, rejected, report)` for `candidates` in order, seeds first in the pool.

    Candidates need `instruction`; one without `id` is given `machine_<position>` (1-based).
    Kept records are the inputs plus `max_rouge_l` and `most_similar`; rejected ones also get
    `reason`. Heuristic rejects are never compared by ROUGE-L (`max_rouge_l` null), except
    `seed_copy`, which points at its seed with score 1.0.
    """
    started = time.perf_counter()
    options = cfg.heuristic_options
    seed_by_text = {}
    for seed in seeds:
        seed_by_text.setdefault(normalize_instruction(seed.instruction), seed)
    records = [dict(r, id=str(r["id"])) if "id" in r else dict(r, id=f"machine_{i}")
               for i, r in enumerate(candidates, start=1)]

    index = RougeIndex(cfg.threshold, cfg.tokenizer)
    texts = {seed.id: seed.instruction for seed in seeds}
    rejected: list[dict] = []
    survivors: list[dict] = []
    seed_texts = set(seed_by_text)
    for record in records:
        reason = heuristic_reason(record["instruction"], seed_texts, options)
        if reason is None:
            survivors.append(record)
            continue
        match = seed_by_text.get(normalize_instruction(record["instruction"])) if reason == "seed_copy" else None
        rejected.append(dict(record, reason=reason, max_rouge_l=1.0 if match else None,
                             most_similar={"id": match.id, "instruction": match.instruction} if match else None))
    heuristics_s = time.perf_counter() - started

    index.prepare_order([seed.instruction for seed in seeds] + [r["instruction"] for r in survivors])
    for seed in seeds:
        index.add(seed.id, seed.instruction)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(survivors), desc="filter", unit="instr", leave=False)
    results = index.add_unless_similar([(r["id"], r["instruction"]) for r in survivors],
                                       on_block=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    rouge_s = time.perf_counter() - started - heuristics_s

    kept: list[dict] = []
    for record, (keep, score, best_id) in zip(survivors, results):
        texts[record["id"]] = record["instruction"]
        nearest = {"id": best_id, "instruction": texts[best_id]} if best_id is not None else None
        if keep:
            kept.append(dict(record, max_rouge_l=score, most_similar=nearest))
        else:
            rejected.append(dict(record, reason="near_duplicate", max_rouge_l=score, most_similar=nearest))

    exact = len(index) <= cfg.exact_scores_limit
    if exact and kept:
        positions = list(range(len(seeds), len(seeds) + len(kept)))  # kept ones join the pool in order
        for record, (score, best_id) in zip(kept, index.exact_best_earlier(positions)):
            record["max_rouge_l"] = score
            record["most_similar"] = {"id": best_id, "instruction": texts[best_id]} if best_id is not None else None
    total_s = time.perf_counter() - started

    by_reason = {reason: 0 for reason in REASONS}
    for record in rejected:
        by_reason[record["reason"]] += 1
    report = {
        "input": len(records),
        "seeds": len(seeds),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": by_reason,
        "threshold": cfg.threshold,
        "tokenizer": cfg.tokenizer,
        "heuristics": options.enabled,
        "max_rouge_l_histogram": _histogram([r["max_rouge_l"] for r in kept]),
        "max_rouge_l_exact": "all" if exact else "above the threshold; a lower bound below it",
        "pairs": {"possible": index.pairs_possible, "compared": index.pairs_compared,
                  "pruned": index.pairs_possible - index.pairs_compared},
        "seconds": {"heuristics": round(heuristics_s, 3), "rouge_l": round(rouge_s, 3),
                    "exact_scores": round(total_s - heuristics_s - rouge_s, 3), "total": round(total_s, 3)},
    }
    return kept, rejected, report


def _load_candidates(path) -> list[dict]:
    """All candidates, each with a string id (`machine_<line>` where missing); ids must be unique."""
    records, seen = [], {}

    def check(record: dict, line: int) -> None:
        record_id = str(record["id"]) if "id" in record else f"machine_{line}"
        if record_id in seen:
            raise InputError(path, line, "id", f"duplicate id {record_id!r} (first on line {seen[record_id]})")
        seen[record_id] = line
        records.append(dict(record, id=record_id))

    for _ in read_records(path, INSTRUCTION_FIELDS, check):
        pass
    if not records:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def run(cfg: Config, *, client=None) -> Stats:
    started = time.perf_counter()
    candidates = _load_candidates(cfg.in_path)
    seeds = load_seeds(cfg.seeds)
    seed_ids = {seed.id for seed in seeds}
    clash = next((str(r["id"]) for r in candidates if str(r["id"]) in seed_ids), None)
    if clash is not None:
        raise UserError(f"{cfg.in_path}: id {clash!r} is also a seed id in {cfg.seeds}; most_similar would be ambiguous")
    out = check_output_path(cfg.out, "--out")
    rejected_out = check_output_path(rejected_path_for(out), "--out")
    report_out = check_output_path(cfg.report or report_path_for(out), "--report")
    if len({out.resolve(), rejected_out.resolve(), report_out.resolve(), Path(cfg.in_path).resolve()}) < 4:
        raise UserError("--out/--report: must differ from each other and from --in")

    kept, rejected, report = filter_instructions(candidates, seeds, cfg, progress=True)
    write_jsonl_atomic(out, kept)
    write_jsonl_atomic(rejected_out, rejected)
    report["seconds"]["wall"] = round(time.perf_counter() - started, 3)
    write_json_atomic(report_out, report)
    write_resolved_config(cfg, out)
    _print_summary(report, out, rejected_out, report_out)
    return Stats(read=report["input"], kept=report["kept"], rejected=report["rejected_by_reason"],
                 seconds=report["seconds"]["wall"], report=report)


def _print_summary(report: dict, out: Path, rejected_out: Path, report_out: Path) -> None:
    pairs = report["pairs"]
    share = pairs["pruned"] / pairs["possible"] if pairs["possible"] else 0.0
    rows = [("read", report["input"]), ("kept", report["kept"])]
    rows += [(f"  rejected: {reason}", count) for reason, count in report["rejected_by_reason"].items() if count]
    width = max(len(name) for name, _ in rows)
    print(f"filter: threshold {report['threshold']}, tokenizer {report['tokenizer']}, "
          f"heuristics {'on' if report['heuristics'] else 'off'}, {report['seeds']} seeds")
    for name, count in rows:
        print(f"  {name:<{width}}  {count:>9,}")
    print(f"  pairs: {pairs['possible']:,} possible, {pairs['compared']:,} compared, {share:.1%} pruned")
    hist = report["max_rouge_l_histogram"]
    print("  highest ROUGE-L of kept: " + "  ".join(f"{lo:.1f}+:{n}" for lo, n in zip(hist["edges"], hist["counts"]) if n))
    print(f"  {report['seconds']['wall']:.2f} s -> {out} ({report['kept']:,}), {rejected_out} ({report['rejected']:,}), {report_out}")
