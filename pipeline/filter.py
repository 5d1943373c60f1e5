"""Drop near-duplicate instructions by ROUGE-L against the seeds and each other (Self-Instruct, step 2).

    python -m pipeline filter --in data/machine_instructions.jsonl --seeds seeds/seed_tasks.jsonl \\
        --out data/filtered_instructions.jsonl --report data/filter_report.json --threshold 0.7

The decision rule is the Self-Instruct / Alpaca one: the seeds start the pool; in input order,
a candidate is dropped if its highest ROUGE-L F1 (beta 1, no stemming) against the pool is
above `--threshold`, else it joins the pool at once. `pipeline.similarity.RougeIndex` makes that
exact and fast (prefix, length, positional and bag-overlap bounds in numpy, then blocks of pairs
in rapidfuzz's C++ for the exact LCS). When seeds and candidates fit `--exact-scores-limit`, one
pass bounds every pair instead and gives every record its exact highest score: 2,175 Alpaca
instructions in about 30 ms against about 66 s for rouge_score (bench/bench_filter.py).
Tokens (`--tokenizer`): `multilingual` (the default) is rouge_score's tokenizer on ASCII, so
English decisions are rouge_score's; Japanese is scored on the task without its request frame
(次の…を…してください), as readings in character bigrams (`pipeline.ja_tokens`). On 96 labelled
Japanese pairs (tests/fixtures/ja_near_duplicates.jsonl) at 0.7 its precision / recall is
0.957 / 0.938 (0.909 / 0.833 on the 24 held out), where one token per character had 0.613 /
0.958: it no longer drops one distinct same-frame task in two. `rouge` gives Japanese no tokens
at all; the report counts such texts and the stage warns.
Before it, the named checks of `pipeline.heuristics` drop what a text-only model cannot use
(`--no-heuristics` turns them off); `generate` runs the same checks online, on every candidate
before it joins its pool, so a file written by `generate` passes them again here unless the
limits were changed. No check rejects non-ASCII text.

Reason codes (in `<out>.rejected.jsonl` and the report):
`too_short`, `too_long` (words for space-separated text, characters for Japanese),
`blacklist` (needs images, files, audio...), `program_prefix` ("Write a program..."),
`punctuation_start`, `seed_copy` (the same text as a seed after normalisation),
`eval_overlap` (the same text as, or ROUGE-L above the threshold against, a held-out seed task:
decontamination, so `eval --data heldout` measures tasks never trained on; see `pipeline.seeds`),
`near_duplicate` (ROUGE-L above the threshold).

Kept records keep every input field unchanged and add the filter's own provenance:
`filter_max_rouge_l` and `filter_most_similar` ({id, instruction}): the highest ROUGE-L against
the pool when the record was decided (the seeds and the earlier kept ones). They have their own
names because `generate` already wrote `max_rouge_l` and `most_similar` (its online score, and
the neighbour's id) and a later stage never changes an earlier stage's field. The score is exact
when the pool is at most `--exact-scores-limit` records; above that it is exact above the
threshold and a lower bound below it (the report says which).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import option, validate, write_resolved_config
from pipeline.errors import InputError, UserError
from pipeline.heuristics import (HEURISTIC_REASONS, MAX_CHARS_JA, MAX_WORDS, MIN_CHARS_JA, MIN_WORDS,
                                 HeuristicOptions, fold_width_case_space, heuristic_reason)
from pipeline.jsonl import (INSTRUCTION_FIELDS, check_output_path, claim_outputs, is_special, locked_outputs, read_records,
                            rejected_path_for, write_json_atomic, write_jsonl_atomic)
from pipeline.plots import histogram
from pipeline.seeds import EVAL_OVERLAP, HeldoutGuard, SeedTask, heldout_ids_for, load_seeds
from pipeline.similarity import NEAR_DUPLICATE_THRESHOLD, THRESHOLD_BOUNDS, RougeIndex

NEAR_DUPLICATE = "near_duplicate"
REASONS = HEURISTIC_REASONS + (EVAL_OVERLAP, NEAR_DUPLICATE)

# Exact highest scores for every record bound all (record, earlier record) pairs: about 12M
# pairs for a 5,000-record pool, ~0.1 s (RougeIndex.add_unless_similar_exact).
EXACT_SCORES_LIMIT = 5_000


@dataclass(frozen=True)
class Config:
    in_path: str = option("data/machine_instructions.jsonl", "generated instructions to filter", flag="--in")
    seeds: str = option("seeds/seed_tasks.jsonl", "seed tasks; they start the pool")
    out: str = option("data/filtered_instructions.jsonl", "the kept instructions (rejected ones go to <out stem>.rejected.jsonl)")
    report: str | None = option(None, "JSON report: counts by reason, score histogram, timing (default: <out stem>.report.json)")
    threshold: float = option(NEAR_DUPLICATE_THRESHOLD, "drop a candidate whose highest ROUGE-L F1 against the pool is above this",
                              **THRESHOLD_BOUNDS)
    tokenizer: Literal["multilingual", "rouge"] = option(
        "multilingual", "ROUGE-L tokens: rouge_score's exact tokenizer (no tokens for Japanese), or the same on ASCII "
                        "and Japanese without its request frame, as reading bigrams (pipeline/ja_tokens.py)")
    heuristics: bool = option(True, "apply the length, blacklist, prefix, punctuation and seed-copy checks")
    min_words: int = option(MIN_WORDS, "too_short: at most this many words", min=0)
    max_words: int = option(MAX_WORDS, "too_long: more than this many words")
    min_chars_ja: int = option(MIN_CHARS_JA, "too_short for Japanese: at most this many characters", min=0)
    max_chars_ja: int = option(MAX_CHARS_JA, "too_long for Japanese: more than this many characters")
    exact_scores_limit: int = option(EXACT_SCORES_LIMIT, "compute every kept record's exact highest ROUGE-L when the pool is at most this big",
                                     min=0)

    def __post_init__(self):
        validate(self)  # bounds from the field metadata; the rules between fields follow
        if self.max_words <= self.min_words:
            raise UserError(f"--min-words/--max-words: need 0 <= min < max, got {self.min_words} and {self.max_words}")
        if self.max_chars_ja <= self.min_chars_ja:
            raise UserError(f"--min-chars-ja/--max-chars-ja: need 0 <= min < max, got {self.min_chars_ja} and {self.max_chars_ja}")

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
    """The kept records' highest ROUGE-L (Self-Instruct, Figure 3), in the bins `inspect` draws."""
    rows = histogram(scores)
    return {"edges": [low for low, _, _ in rows] + [rows[-1][1]], "counts": [count for _, _, count in rows]}


def filter_instructions(candidates: list[dict], seeds: list[SeedTask], cfg: Config,
                        progress: bool = False, heldout_ids: set[str] = frozenset()) -> tuple[list[dict], list[dict], dict]:
    """The stage's pure core: `(kept, rejected, report)` for `candidates` in order, seeds first in the pool.

    Candidates need `instruction`; one without `id` is given `machine_<position>` (1-based).
    Kept records are the inputs plus `filter_max_rouge_l` and `filter_most_similar`; rejected
    ones also get `reason`. Heuristic rejects are never compared by ROUGE-L
    (`filter_max_rouge_l` null), except `seed_copy`, which points at its seed with score 1.0.
    Seeds whose id is in `heldout_ids` stay in the pool; a candidate too close to one is
    rejected as `eval_overlap` (pointing at it) before the near-duplicate rule.
    """
    started = time.perf_counter()
    # Every record returned is a new dict, so an input is copied here only when its id changes.
    records = [r if isinstance(r.get("id"), str) else dict(r, id=str(r["id"])) if "id" in r else dict(r, id=f"machine_{i}")
               for i, r in enumerate(candidates, start=1)]
    survivors, rejected = _apply_heuristics(records, seeds, cfg.heuristic_options, heldout_ids)
    guard = HeldoutGuard([seed for seed in seeds if seed.id in heldout_ids], cfg.threshold, cfg.tokenizer)
    survivors, overlapping = _apply_eval_overlap(guard, survivors)
    rejected += overlapping
    heuristics_s = time.perf_counter() - started

    index = RougeIndex(cfg.threshold, cfg.tokenizer)
    kept, near, exact = _apply_rouge_l(index, seeds, survivors, progress, cfg.exact_scores_limit)
    rejected += near
    total_s = time.perf_counter() - started
    seconds = {"heuristics": round(heuristics_s, 3), "rouge_l": round(total_s - heuristics_s, 3), "total": round(total_s, 3)}
    report = _report(records, seeds, kept, rejected, cfg, index, exact, seconds)
    report["heldout_seeds"] = len(guard.by_id)
    return kept, rejected, report


def _apply_eval_overlap(guard: HeldoutGuard, survivors: list[dict]) -> tuple[list[dict], list[dict]]:
    """`(survivors, rejected)`: candidates too close to a held-out task are dropped as `eval_overlap`."""
    kept, rejected = [], []
    for record, hit in zip(survivors, guard.overlaps([r["instruction"] for r in survivors])):
        if hit is None:
            kept.append(record)
            continue
        score, task = hit
        rejected.append(dict(record, reason=EVAL_OVERLAP, filter_max_rouge_l=score,
                             filter_most_similar={"id": task.id, "instruction": task.instruction}))
    return kept, rejected


def _nearest(item_id: str | None, index: RougeIndex) -> dict | None:
    return {"id": item_id, "instruction": index.text_of(item_id)} if item_id is not None else None


def _apply_heuristics(records: list[dict], seeds: list[SeedTask], options: HeuristicOptions,
                      heldout_ids: set[str] = frozenset()) -> tuple[list[dict], list[dict]]:
    """`(survivors, rejected)`: the named checks of `pipeline.heuristics`, each record alone."""
    if not options.enabled:  # every check is off: nothing to fold or look up
        return list(records), []
    seed_by_form: dict[str, SeedTask] = {}
    for seed in seeds:
        seed_by_form.setdefault(fold_width_case_space(seed.instruction), seed)
    seed_forms = set(seed_by_form)
    survivors, rejected = [], []
    for record in records:
        reason = heuristic_reason(record["instruction"], seed_forms, options)
        if reason is None:
            survivors.append(record)
            continue
        match = seed_by_form.get(fold_width_case_space(record["instruction"])) if reason == "seed_copy" else None
        if match is not None and match.id in heldout_ids:
            reason = EVAL_OVERLAP  # a copy of a held-out task is contamination first
        rejected.append(dict(record, reason=reason, filter_max_rouge_l=1.0 if match else None,
                             filter_most_similar={"id": match.id, "instruction": match.instruction} if match else None))
    return survivors, rejected


def _apply_rouge_l(index: RougeIndex, seeds: list[SeedTask], survivors: list[dict], progress: bool,
                   exact_scores_limit: int) -> tuple[list[dict], list[dict], bool]:
    """`(kept, near_duplicates, exact)`: the greedy ROUGE-L rule, seeds first in the pool, then in input order.

    `exact`: every kept record's score is exact, because the pool is at most `exact_scores_limit`.
    When seeds and survivors together fit it, one pass decides and scores every pair
    (`add_unless_similar_exact`); otherwise the index decides, and if the pool it left fits,
    `_with_exact_scores` rescores the kept ones.
    """
    one_pass = len(seeds) + len(survivors) <= exact_scores_limit
    if not one_pass:  # the token order only speeds up the index's queries
        index.prepare_order([seed.instruction for seed in seeds] + [r["instruction"] for r in survivors])
    index.add_all([(seed.id, seed.instruction) for seed in seeds])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(survivors), desc="filter", unit="instr", leave=False)
    decide = index.add_unless_similar_exact if one_pass else index.add_unless_similar
    results = decide([(r["id"], r["instruction"]) for r in survivors], on_block=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    scored = [dict(record, filter_max_rouge_l=score, filter_most_similar=_nearest(best_id, index))
              for record, (_, score, best_id) in zip(survivors, results)]
    kept = [record for record, (keep, _, _) in zip(scored, results) if keep]
    near = [dict(record, reason=NEAR_DUPLICATE) for record, (keep, _, _) in zip(scored, results) if not keep]
    rescore = not one_pass and len(index) <= exact_scores_limit
    if rescore:
        kept = _with_exact_scores(index, len(seeds), kept)
    return kept, near, one_pass or rescore


def _with_exact_scores(index: RougeIndex, num_seeds: int, kept: list[dict]) -> list[dict]:
    """The kept records with their exact highest score (`add_unless_similar` gives lower bounds below the threshold)."""
    positions = list(range(num_seeds, num_seeds + len(kept)))  # kept ones joined the pool in order
    return [dict(record, filter_max_rouge_l=score, filter_most_similar=_nearest(best_id, index))
            for record, (score, best_id) in zip(kept, index.exact_best_earlier(positions))]


def _report(records: list[dict], seeds: list[SeedTask], kept: list[dict], rejected: list[dict], cfg: Config,
            index: RougeIndex, exact: bool, seconds: dict) -> dict:
    by_reason = {reason: 0 for reason in REASONS}
    for record in rejected:
        by_reason[record["reason"]] += 1
    return {
        "input": len(records),
        "seeds": len(seeds),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": by_reason,
        "threshold": cfg.threshold,
        "tokenizer": cfg.tokenizer,
        "heuristics": cfg.heuristics,
        "max_rouge_l_histogram": _histogram([r["filter_max_rouge_l"] for r in kept]),
        "max_rouge_l_exact": "all" if exact else "above the threshold; a lower bound below it",
        "pairs": {"possible": index.pairs_possible, "compared": index.pairs_compared,
                  "pruned": index.pairs_possible - index.pairs_compared, "bounded": index.pairs_bounded},
        # Texts the tokenizer turned into nothing (Japanese under `rouge`): never compared.
        "texts_without_tokens": index.tokenless,
        "tokenizer_warning": index.tokenless_warning(),
        "seconds": seconds,
    }


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


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    started = time.perf_counter()
    candidates = _load_candidates(cfg.in_path)
    seeds = load_seeds(cfg.seeds)
    seed_ids = {seed.id for seed in seeds}
    clash = next((str(r["id"]) for r in candidates if str(r["id"]) in seed_ids), None)
    if clash is not None:
        raise UserError(f"{cfg.in_path}: id {clash!r} is also a seed id in {cfg.seeds}; filter_most_similar would be ambiguous")
    out = check_output_path(cfg.out, "--out")
    rejected_out = check_output_path(rejected_path_for(out), "--out")
    report_out = check_output_path(cfg.report or report_path_for(out), "--report")
    files = [p.resolve() for p in (out, rejected_out, report_out) if not is_special(p)]  # /dev/null may take all three
    if len(set(files)) < len(files):
        raise UserError("--out/--report: must differ from each other")
    claim_outputs({"--in": cfg.in_path, "--seeds": cfg.seeds}, {"--out": [out, rejected_out], "--report": report_out})

    kept, rejected, report = filter_instructions(candidates, seeds, cfg, progress=True,
                                                 heldout_ids=heldout_ids_for(cfg.seeds, seeds))
    write_jsonl_atomic(out, kept)
    write_jsonl_atomic(rejected_out, rejected, keep_empty=False)
    report["seconds"]["wall"] = round(time.perf_counter() - started, 3)
    write_json_atomic(report_out, report)
    write_resolved_config(cfg, out)
    print_summary(report, out, rejected_out, report_out)
    return Stats(read=report["input"], kept=report["kept"], rejected=report["rejected_by_reason"],
                 seconds=report["seconds"]["wall"], report=report)


def print_summary(report: dict, out: Path, rejected_out: Path, report_out: Path) -> None:
    pairs = report["pairs"]
    share = pairs["pruned"] / pairs["possible"] if pairs["possible"] else 0.0
    rows = [("read", report["input"]), ("kept", report["kept"])]
    rows += [(f"  rejected: {reason}", count) for reason, count in report["rejected_by_reason"].items() if count]
    width = max(len(name) for name, _ in rows)
    print(f"filter: threshold {report['threshold']}, tokenizer {report['tokenizer']}, "
          f"heuristics {'on' if report['heuristics'] else 'off'}, {report['seeds']} seeds "
          f"({report.get('heldout_seeds', 0)} held out: candidates close to them are dropped as {EVAL_OVERLAP})")
    for name, count in rows:
        print(f"  {name:<{width}}  {count:>9,}")
    bounded = f" (all {pairs['bounded']:,} bounded by an LCS over 255 codes first)" if pairs.get("bounded") else ""
    print(f"  pairs: {pairs['possible']:,} possible, {pairs['compared']:,} compared exactly, {share:.1%} pruned{bounded}")
    hist = report["max_rouge_l_histogram"]
    print("  highest ROUGE-L of kept: " + "  ".join(f"{lo:.1f}+:{n}" for lo, n in zip(hist["edges"], hist["counts"]) if n))
    rejected = f"{rejected_out} ({report['rejected']:,})" if report["rejected"] else "nothing rejected"
    print(f"  {report['seconds']['wall']:.2f} s -> {out} ({report['kept']:,}), {rejected}, {report_out}")
    if report["tokenizer_warning"]:
        print(f"warning: {report['tokenizer_warning']}", file=sys.stderr)
