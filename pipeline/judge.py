"""Score every training record with an LLM judge; low-scored records can be kept out of training.

    python -m pipeline judge --in data/alpaca_data.jsonl --out data/judged.jsonl \\
        [--backend openai --model gpt-4o-mini] [--min-score 3] [--rubric my_rubric.txt]

(or `make judge`). Reads Alpaca or `messages` records (eval's prediction files too: there the
judged answer is `prediction` and `output` is the reference). Each record gets a `judge` object:

    {"score": 4, "reason": "...", "model": ..., "backend": ..., "rubric": "judge_pointwise_en",
     "rubric_sha256": ..., "scoring": "text" | "probs", "distribution": {"1": 0.01, ...}, ...}

- The rubric (pipeline/prompt_files/judge_pointwise_{en,ja}.txt, or `--rubric FILE`) is picked
  by the language of the record's instruction; a record with a reference answer (`reference`,
  or eval's `output` beside `prediction`) shows it to the judge. Prompts and parsing live in
  `pipeline/judging.py`, shared with the stages that compare answers.
- `--scoring probs` (the default on the local backend) asks for the bare digit and scores the
  expectation over the five digit tokens' probabilities (G-Eval): a float, with the
  distribution stored; one forward pass per record on the local model. `--scoring text` (the
  default on `openai`) asks for `{"reason", "score"}` with `response_format` json_schema and
  reads plain replies tolerantly; a reply that does not parse is asked again once, then the
  record goes to `<out stem>.rejected.jsonl` with reason `judge_unparsed`.
- `--min-score S`: records scoring below S go to the rejected file with reason `low_score`,
  their score and the judge's reason; the rest to `--out`. Without it every scored record is kept.
  Scores stay with the records, so a rerun with another `--min-score` (or none) re-splits the
  two files without asking the judge again.

Resuming: every record's key is a hash of what is judged (instruction, input, answer,
reference) and its occurrence number, stored in `judge.record_key`; a rerun skips the keys
found in either output file, so after `kill -9` it asks only for what is missing. A request that
fails after all retries is written nowhere and asked again by the next run.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import judging
from pipeline.backends import BackendOptions, open_client
from pipeline.config import option, validate, write_resolved_config
from pipeline.errors import InputError
from pipeline.jsonl import (AppendLog, check_output_path, claim_outputs, load_records, locked_outputs, rejected_path_for,
                            write_jsonl_atomic)
from pipeline.records import training_record_validator

LOW_SCORE = "low_score"
UNPARSED = "judge_unparsed"
REJECT_REASONS = (LOW_SCORE, UNPARSED)
KEY_CHARS = 16  # of the SHA-256 of the judged content: collisions are not a concern at any data size
# Summary buckets: probability scores are rounded to the nearest of the integer steps.
BUCKETS = tuple(range(judging.SCORE_MIN, judging.SCORE_MAX + 1))
BAR_WIDTH = 40  # characters of the longest histogram bar in the summary


@dataclass(frozen=True)
class Config(BackendOptions):
    in_path: str = option("data/alpaca_data.jsonl", "Alpaca or messages records to judge", flag="--in")
    out: str = option("data/judged.jsonl", "judged records (each with a `judge` object), appended as they are scored")
    min_score: float | None = option(None, "records scoring below this go to <out>.rejected.jsonl with reason "
                                           "low_score; unset, every scored record is kept",
                                     min=judging.SCORE_MIN, max=judging.SCORE_MAX)
    scoring: Literal["auto", "text", "probs"] = option(
        "auto", "probs: expectation over the digit tokens' probabilities (G-Eval); text: a JSON score and reason; "
                "auto: probs on the local backend, text on openai", choices=("auto", "text", "probs"))
    structured: bool = option(True, "text scoring on openai: ask for JSON with response_format json_schema "
                                    "(--no-structured for a server that refuses it)")
    rubric: str | None = option(None, "rubric file replacing the built-in English and Japanese ones; "
                                      "slots {question} and {answer}, optional {format}")
    temperature: float = option(0.0, "judge sampling temperature (0: the same record gets the same score)", min=0)
    max_tokens: int = option(256, "most tokens of a text reply (score and reason)", min=1)
    limit: int | None = option(None, "judge only the first N records", min=1)

    def __post_init__(self):
        super().__post_init__()
        validate(self)

    @property
    def resolved_scoring(self) -> judging.Scoring:
        return judging.resolve_scoring(self.scoring, self.backend)

    def settings(self) -> judging.JudgeSettings:
        return judging.JudgeSettings(scoring=self.resolved_scoring, structured=self.structured,
                                     temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed,
                                     rubric=self.rubric)


@dataclass
class Stats:
    records: int = 0
    resumed: int = 0  # found in the output files at start
    judged: int = 0  # scored (or given up on) in this run
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failed: int = 0  # requests that failed after all retries; the next run asks again
    reasked: int = 0
    moved: int = 0  # records judged before, moved between the files because --min-score changed
    scoring: dict[str, int] = field(default_factory=dict)  # probs / text: how each score was read
    histogram: dict[str, int] = field(default_factory=dict)  # every scored record in both files
    mean: float | None = None
    mean_by_language: dict[str, float] = field(default_factory=dict)
    mean_by_kind: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    stopped: str = ""  # max_tokens_total or budget when a spending limit ended the run


@dataclass(frozen=True)
class Entry:
    """One input record and what the judge sees of it."""

    record: dict
    item: judging.JudgeItem
    kind: str  # classification, with_input, no_input, chat: the summary's task kinds


# ---------------------------------------------------------------- reading records


def judged_parts(record: dict) -> tuple[str, str, str, str]:
    """(instruction, input, answer, reference) of an Alpaca, messages or eval-prediction record."""
    if "messages" in record:
        turns = record["messages"]
        last = max(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
        # The last answer is judged, against the user turn it answers; earlier turns are context
        # the rubric does not show (a conversation's first turns are judged as their own records).
        user = next((turns[i]["content"] for i in range(last - 1, -1, -1) if turns[i]["role"] == "user"), "")
        return user, "", turns[last]["content"], ""
    given = record.get("input") or ""
    if isinstance(record.get("prediction"), str):
        return record["instruction"], given, record["prediction"], record.get("output") or ""
    reference = record.get("reference") if isinstance(record.get("reference"), str) else ""
    return record["instruction"], given, record["output"], reference


def task_kind(record: dict, given: str) -> str:
    if "messages" in record:
        return "chat"
    if record.get("is_classification") is True:
        return "classification"
    return "with_input" if given.strip() else "no_input"


def load_entries(path, limit: int | None) -> list[Entry]:
    """Every record, validated before any output is written, with a key that survives reordering."""
    records = load_records(path, validate=training_record_validator(path))
    if limit is not None:
        records = records[:limit]
    seen: Counter[str] = Counter()
    entries = []
    for record in records:
        instruction, given, answer, reference = judged_parts(record)
        digest = hashlib.sha256(json.dumps([instruction, given, answer, reference], ensure_ascii=False)
                                .encode("utf-8")).hexdigest()[:KEY_CHARS]
        # Two identical records are two records: the n-th copy has its own key.
        key = f"{digest}#{seen[digest]}"
        seen[digest] += 1
        entries.append(Entry(record, judging.JudgeItem(key, instruction, answer, given, reference), task_kind(record, given)))
    return entries


def settled_keys(records: list[dict], path: Path) -> set[str]:
    keys = set()
    for line, record in enumerate(records, start=1):
        key = (record.get("judge") or {}).get("record_key") if isinstance(record.get("judge"), dict) else None
        if not isinstance(key, str):
            raise InputError(path, line, "judge.record_key", "missing: this file was not written by `judge`; "
                             "use another --out")
        keys.add(key)
    return keys


# ---------------------------------------------------------------- one judged record


def judge_object(judgement: judging.Judgement, entry: Entry) -> dict:
    last = judgement.responses[-1]
    rubric = judgement.rubric
    out = {"score": judgement.score, "reason": judgement.reason, "model": last.model, "backend": last.backend,
           "engine": last.engine, "precision": last.precision,
           "rubric": rubric.name if rubric else "", "rubric_sha256": rubric.sha256 if rubric else "",
           "scoring": judgement.scoring, "parsed_as": judgement.parsed_as, "language": entry.item.lang}
    if judgement.distribution is not None:
        out.update(distribution=judgement.distribution, digit_mass=judgement.digit_mass)
    if judgement.unparsed:
        out["raw_answers"] = [r.texts[0] if r.texts else "" for r in judgement.responses]
    out.update(reasked=judgement.reasked, record_key=entry.item.key, request_id=last.request_id or "",
               cached=all(r.cached for r in judgement.responses),
               usage={"prompt_tokens": sum(r.prompt_tokens for r in judgement.responses),
                      "completion_tokens": sum(r.completion_tokens for r in judgement.responses)})
    return out


def settle(entry: Entry, judgement: judging.Judgement, cfg: Config, kept: AppendLog, rejected: AppendLog,
           stats: Stats) -> None:
    """Write one judged record to exactly one of the two files."""
    verdict = judge_object(judgement, entry)
    stats.judged += 1
    stats.reasked += judgement.reasked
    if judgement.unparsed:
        rejected.write({**entry.record, "reason": UNPARSED, "judge": verdict})
        stats.rejected[UNPARSED] = stats.rejected.get(UNPARSED, 0) + 1
        return
    stats.scoring[judgement.scoring] = stats.scoring.get(judgement.scoring, 0) + 1
    if cfg.min_score is not None and judgement.score < cfg.min_score:
        rejected.write({**entry.record, "reason": LOW_SCORE, "score": judgement.score, "judge": verdict})
        stats.rejected[LOW_SCORE] = stats.rejected.get(LOW_SCORE, 0) + 1
        return
    kept.write({**entry.record, "judge": verdict})
    stats.kept += 1


# ---------------------------------------------------------------- the stage


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    started = time.monotonic()
    out = check_output_path(cfg.out, "--out")
    rejected_path = check_output_path(rejected_path_for(out), "--out")
    claim_outputs({"--in": cfg.in_path, "--rubric": cfg.rubric}, {"--out": [out, rejected_path]})
    for language in judging.LABELS:  # a bad --rubric fails before any model is loaded
        judging.load_rubric("pointwise", language, cfg.rubric)
    entries = load_entries(cfg.in_path, cfg.limit)
    stats = Stats(records=len(entries))
    # The client first: a model that fails to load must not leave empty output files behind.
    client = open_client(cfg, client)
    try:
        with AppendLog(out) as kept, AppendLog(rejected_path) as rejected:
            done = settled_keys(kept.records, out) | settled_keys(rejected.records, rejected_path)
            stats.resumed = sum(entry.item.key in done for entry in entries)
            pending = [entry for entry in entries if entry.item.key not in done]
            _judge(pending, cfg, client, stats, kept, rejected)
    finally:
        client.close()
    stats.moved = apply_min_score(out, rejected_path, cfg.min_score)
    scored = [r for path in (out, rejected_path) for r in written_records(path)
              if isinstance(r["judge"].get("score"), (int, float))]
    summarize_scores(scored, stats)
    totals = client.totals
    stats.requests, stats.cached = totals.requests, totals.cached
    stats.prompt_tokens, stats.completion_tokens = totals.prompt_tokens, totals.completion_tokens
    stats.stopped = getattr(client, "stopped", None) or ""
    stats.seconds = round(time.monotonic() - started, 3)
    write_resolved_config(cfg, out, {"stats": asdict(stats)})
    print_summary(stats, cfg, out, rejected_path)
    return stats


def written_records(path: Path) -> list[dict]:
    """The records of an output file; none when it is absent (an AppendLog left empty removes its file)."""
    return load_records(path, allow_empty=True) if path.is_file() else []


def apply_min_score(out: Path, rejected_path: Path, min_score: float | None) -> int:
    """Put every earlier record on the side of `min_score` this run asks for; returns how many moved.

    Scores are kept with the records, so changing `--min-score` (or dropping it) re-splits the
    files without asking the judge again. First each file is rewritten without the records that
    leave it, then those are appended to the other: a crash in between loses them from both
    files, and the next run judges them again (from the cache), rather than keeping a copy in each.
    """
    kept, rejected = written_records(out), written_records(rejected_path)

    def low(record: dict) -> bool:
        return min_score is not None and record["judge"]["score"] < min_score

    demoted = [r for r in kept if low(r)]
    restored = [r for r in rejected if r.get("reason") == LOW_SCORE and not low(r)]
    if not demoted and not restored:
        return 0
    leaving = {id(r) for r in demoted + restored}
    write_jsonl_atomic(out, [r for r in kept if id(r) not in leaving], keep_empty=False)
    write_jsonl_atomic(rejected_path, [r for r in rejected if id(r) not in leaving], keep_empty=False)
    with AppendLog(out) as kept_log, AppendLog(rejected_path) as rejected_log:
        for record in restored:
            kept_log.write({k: v for k, v in record.items() if k not in ("reason", "score")})
        for record in demoted:
            rejected_log.write({**record, "reason": LOW_SCORE, "score": record["judge"]["score"]})
    return len(demoted) + len(restored)


def _judge(pending: list[Entry], cfg: Config, client, stats: Stats, kept: AppendLog, rejected: AppendLog) -> None:
    from tqdm import tqdm

    by_key = {entry.item.key: entry for entry in pending}
    with tqdm(total=len(pending), desc="judge", unit="rec", disable=None, file=sys.stderr) as bar:
        for item, judgement in judging.judge_items(client, (e.item for e in pending), cfg.settings()):
            bar.update()
            if judgement.error is not None:
                stats.failed += 1
                continue
            settle(by_key[item.key], judgement, cfg, kept, rejected, stats)
            bar.set_postfix(kept=stats.kept, rejected=sum(stats.rejected.values()), refresh=False)


def summarize_scores(records: list[dict], stats: Stats) -> None:
    """Histogram and means over every scored record in both files (this run's and earlier ones)."""
    histogram = Counter(str(judging.score_bucket(r["judge"]["score"])) for r in records)
    stats.histogram = {str(b): histogram.get(str(b), 0) for b in BUCKETS}
    scores = [r["judge"]["score"] for r in records]
    stats.mean = round(statistics.fmean(scores), 3) if scores else None
    by_language: dict[str, list[float]] = defaultdict(list)
    by_kind: dict[str, list[float]] = defaultdict(list)
    for record in records:
        score = record["judge"]["score"]
        by_language[record["judge"].get("language") or "?"].append(score)
        _, given, _, _ = judged_parts(record)
        by_kind[task_kind(record, given)].append(score)
    stats.mean_by_language = {k: round(statistics.fmean(v), 3) for k, v in sorted(by_language.items())}
    stats.mean_by_kind = {k: round(statistics.fmean(v), 3) for k, v in sorted(by_kind.items())}


def histogram_lines(histogram: dict[str, int]) -> list[str]:
    top = max(histogram.values(), default=0) or 1
    return [f"    {bucket}  {'#' * round(BAR_WIDTH * count / top):<{BAR_WIDTH}} {count}" for bucket, count in histogram.items()]


def print_summary(stats: Stats, cfg: Config, out: Path, rejected_path: Path) -> None:
    rejects = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.rejected.items())) or "none"
    means = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items()) or "-"  # noqa: E731
    scoring = ", ".join(f"{k} {v}" for k, v in sorted(stats.scoring.items())) or "-"
    lines = [
        f"judge: {stats.resumed + stats.judged}/{stats.records} records judged ({stats.judged} this run, "
        f"{stats.resumed} already there); {stats.kept} kept this run in {out}",
        "  scores (all judged records; probability scores rounded to the nearest step):",
        *histogram_lines(stats.histogram),
        f"  mean       {stats.mean if stats.mean is not None else '-'}; by language: {means(stats.mean_by_language)}; "
        f"by task kind: {means(stats.mean_by_kind)}",
        f"  rejected   {sum(stats.rejected.values())} this run -> {rejected_path}: {rejects}"
        + ("" if cfg.min_score is not None else " (no --min-score: only unreadable replies are rejected)"),
        f"  scoring    {scoring}; {stats.reasked} asked again after an unreadable reply",
        f"  requests   {stats.requests} ({stats.cached} cached), {stats.prompt_tokens:,} prompt + "
        f"{stats.completion_tokens:,} completion tokens, {stats.seconds:.1f} s",
    ]
    if stats.moved:
        lines.append(f"  moved      {stats.moved} earlier records between the two files for this --min-score")
    if stats.failed:
        lines.append(f"  {stats.failed} requests failed after all retries: rerun the same command to ask again")
    if stats.stopped:
        flag = "--max-tokens-total" if stats.stopped == "max_tokens_total" else "--budget"
        lines.append(f"  stopped    {flag} reached; raise it and rerun to judge the rest")
    print("\n".join(lines))
