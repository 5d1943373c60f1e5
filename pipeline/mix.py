"""Combine instruction files with weights, deduplicated across sources, into one training file.

    python -m pipeline mix --in data/alpaca_data.jsonl data/converted_qa.jsonl \\
        --weights 1 0.5 --out data/train.jsonl --seed 42 --threshold 0.7

- Sources are read whole and validated first: each line is an Alpaca record (`instruction`,
  optional `input`, `output`) or a chat record (`messages`: role / content turns with a user
  turn); a seed-task file (`seeds/seed_tasks.jsonl`) gives one record per human-written
  instance, so `make demo` trains on the generated data plus the seeds' demonstrations; the
  held-out seed tasks listed beside it (`pipeline.seeds`) are left out, since `eval --data
  heldout` measures them as unseen tasks (`--include-heldout` trains on every seed). Both kinds may sit in one output file; every stage of this pipeline reads JSONL with
  `pipeline.jsonl`, line by line, so the mixed schema is fine for `finetune` (whose default
  `--template auto` picks the chat template for files with chat records). (A generic
  reader that wants one schema per file, such as `datasets.load_dataset("json")` in older
  versions, may refuse it: mix chat and Alpaca data in separate files for those.)
- Deduplication across sources, with the near-duplicate index of the filter stage
  (`pipeline.similarity.RougeIndex`, ROUGE-L F1 above `--threshold`): each record is checked
  against the records kept from the sources before it, and the earlier source's record wins.
  Records within one source are not compared with each other: each file was deduplicated by
  the stage that made it, and converted datasets legitimately hold several questions on one
  passage. The text compared is what the model is asked: the instruction plus the input (a
  converted record's instruction is one of a few fixed phrasings, so the instruction alone
  would call every QA record a copy of every other), or the first user turn of a chat record.
- Weights, applied after deduplication: a source contributes round(weight x its kept records).
  A weight up to 1 samples that many records without replacement; above 1 every record
  appears floor(weight) times and the fraction is sampled without replacement (oversampling by
  repetition, so no record is left out by chance); 0 leaves the source out altogether.
- Provenance: `mix_source` is the input file each record came from; `source` is kept when the
  record has one (convert's input file, say) and set to the input file otherwise.
- Ids stay unique: the first record with an id keeps it; a repeated copy (weight above 1) or
  another source's record with the same id gets `<id>#<n>`, its original in `source_id`, so a
  later stage that keys on ids (resume, judge, preferences) never sees one id twice.
- The result is shuffled with `--seed`, written atomically, and the resolved config with the
  per-source counts is written beside it.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.cards import write_dataset_card
from pipeline.config import option, validate, write_resolved_config
from pipeline.errors import UserError
from pipeline.jsonl import check_output_path, claim_outputs, load_records, locked_outputs, write_jsonl_atomic
from pipeline.records import training_record_validator
from pipeline.similarity import NEAR_DUPLICATE_THRESHOLD, THRESHOLD_BOUNDS



@dataclass(frozen=True)
class Config:
    in_paths: tuple[str, ...] = option((), "instruction files to combine (Alpaca or messages JSONL), in priority "
                                           "order: a near-duplicate keeps the earlier file's record", flag="--in")
    weights: tuple[float, ...] = option((), "one weight per --in file: records taken = weight x records kept "
                                            "(0.5 samples half, 2 repeats each twice; default 1 each)", min=0)
    out: str = option("data/train.jsonl", "the combined training file")
    seed: int = option(42, "seeds the sampling and the shuffle")
    threshold: float = option(NEAR_DUPLICATE_THRESHOLD, "drop a record whose ROUGE-L F1 against an earlier source's record "
                              "is above this", **THRESHOLD_BOUNDS)
    tokenizer: Literal["multilingual", "rouge"] = option("multilingual", "ROUGE-L tokens (multilingual handles Japanese)")
    include_heldout: bool = option(False, "a seed file gives its held-out tasks too (they are eval's unseen tasks, "
                                          "left out by default)")

    def __post_init__(self):
        validate(self)  # bounds from the field metadata; the rules between fields follow
        if not self.in_paths:
            raise UserError("--in: give one or more instruction files to combine")
        if self.weights and len(self.weights) != len(self.in_paths):
            raise UserError(f"--weights: {len(self.weights)} weights for {len(self.in_paths)} --in files; "
                            "give one per file (or none for 1 each)")
        if self.weights and not any(self.weights):
            raise UserError("--weights: all weights are 0; nothing would be written")

    def weight_list(self) -> list[float]:
        return list(self.weights) or [1.0] * len(self.in_paths)


@dataclass
class SourceStats:
    path: str
    weight: float
    read: int = 0
    duplicates: int = 0
    kept: int = 0
    written: int = 0


@dataclass
class Stats:
    out: str
    sources: list[SourceStats] = field(default_factory=list)
    written: int = 0
    seconds: float = 0.0


def validate_record(path):
    """A `read_records` check: what `finetune --template chat` trains on (one definition, records.py)."""
    return training_record_validator(path, template="chat")


def load_source(path, include_heldout: bool = False) -> list[dict]:
    """An instruction file, or a seed-task file expanded into one record per human-written instance
    (its training tasks only, unless `include_heldout`)."""
    from pipeline.seeds import instance_records, is_seed_file, load_seed_split, load_seeds

    if Path(path).is_file() and is_seed_file(path):
        return instance_records(load_seeds(path) if include_heldout else load_seed_split(path).train)
    return load_records(path, validate=validate_record(path))


def dedupe_text(record: dict) -> str:
    """What a near-duplicate is judged on: the prompt the model sees (see the module doc)."""
    if "messages" in record:
        return next(turn["content"] for turn in record["messages"] if turn["role"] == "user")
    if record.get("input"):
        return record["instruction"] + "\n" + record["input"]
    return record["instruction"]


def take_weighted(records: list, weight: float, rng: random.Random) -> list:
    """round(weight x len) records: floor(weight) full copies plus a sample for the fraction."""
    copies = math.floor(weight)
    # Round half up: Python's round() sends 2.5 to 2 and 3.5 to 4, which reads like a bug here.
    extra = math.floor((weight - copies) * len(records) + 0.5)
    return records * copies + rng.sample(records, min(extra, len(records)))


def unique_ids(records: list[dict]) -> list[dict]:
    """The records in order, each id once (see the module doc); records without an id are left as they are."""
    taken = {str(r["id"]) for r in records if r.get("id") is not None}
    used: set[str] = set()
    out = []
    for record in records:
        if record.get("id") is None:
            out.append(record)
            continue
        original = str(record["id"])
        if original not in used:
            used.add(original)
            out.append(record)
            continue
        n = 2
        while f"{original}#{n}" in taken or f"{original}#{n}" in used:
            n += 1
        new_id = f"{original}#{n}"
        used.add(new_id)
        out.append({**record, "id": new_id, "source_id": record.get("source_id", record["id"])})
    return out


def mix(sources: list[tuple[str, list[dict]]], weights: list[float], seed: int, threshold: float,
        tokenizer: str = "multilingual") -> tuple[list[dict], list[SourceStats]]:
    """The records of `sources` ((name, records) in priority order), deduplicated, weighted, shuffled."""
    from pipeline.similarity import RougeIndex

    index = RougeIndex(threshold=threshold, tokenizer=tokenizer)
    rng = random.Random(seed)
    mixed: list[dict] = []
    stats = []
    for number, ((name, records), weight) in enumerate(zip(sources, weights)):
        source = SourceStats(name, weight, read=len(records))
        stats.append(source)
        if weight == 0:
            continue  # left out: it neither contributes records nor blocks later sources' records
        texts = [dedupe_text(record) for record in records]
        matches = index.best_matches(texts) if len(index) else [(0.0, None)] * len(records)
        kept = []
        for row, (record, text, (score, match)) in enumerate(zip(records, texts, matches)):
            if match is not None and score > threshold:
                source.duplicates += 1
                continue
            kept.append({**record, "source": record.get("source", name), "mix_source": name})
            index.add(f"{number}:{row}", text)
        source.kept = len(kept)
        taken = take_weighted(kept, weight, rng)
        source.written = len(taken)
        mixed.extend(taken)
    if index.tokenless_warning():  # e.g. Japanese under --tokenizer rouge: never deduplicated
        print(f"warning: {index.tokenless_warning()}", file=sys.stderr)
    mixed = unique_ids(mixed)
    rng.shuffle(mixed)
    return mixed, stats


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    started = time.monotonic()
    sources = [(path, load_source(path, cfg.include_heldout)) for path in cfg.in_paths]
    out = check_output_path(cfg.out, "--out")
    claim_outputs({"--in": list(cfg.in_paths)}, {"--out": out})
    records, source_stats = mix(sources, cfg.weight_list(), cfg.seed, cfg.threshold, cfg.tokenizer)
    if not records:
        raise UserError("--weights: the weights select no records; nothing was written")
    write_jsonl_atomic(out, records)
    stats = Stats(out=str(out), sources=source_stats, written=len(records), seconds=time.monotonic() - started)
    write_resolved_config(cfg, out, {"sources": [vars(s) for s in source_stats], "written": stats.written})
    write_dataset_card(out, stage="mix", records=records, inputs={f"--in {i}": p for i, p in enumerate(cfg.in_paths, 1)},
                       settings={"weights": list(cfg.weight_list()), "near-duplicate threshold": cfg.threshold})
    print_summary(stats)
    return stats


def print_summary(stats: Stats) -> None:
    width = max(len(s.path) for s in stats.sources)
    lines = [f"mix: {stats.written:,} records -> {stats.out} ({stats.seconds:.1f} s)",
             f"  {'source':<{width}}  weight      read  duplicates      kept   written"]
    for s in stats.sources:
        lines.append(f"  {s.path:<{width}}  {s.weight:>6g}  {s.read:>8,}  {s.duplicates:>10,}  {s.kept:>8,}  {s.written:>8,}")
    lines.append(f"  duplicates dropped across sources: {sum(s.duplicates for s in stats.sources):,}")
    print("\n".join(lines))
