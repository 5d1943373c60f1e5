"""Turn existing task datasets and dialogue logs into instruction data.

    python -m pipeline convert --kind qa --in squad.csv --out data/converted_qa.jsonl

Reads JSONL, JSON, CSV, TSV or Parquet through `datasets.load_dataset` (or, where the machine
has network, a Hugging Face dataset name given to `--in`). Each kind has column flags with
the usual names as defaults:

- `qa`: context / question / answers (SQuAD's `{"text": [...]}` or a plain string; a column
  named `answer` is used when `answers` is absent). An empty answer (SQuAD 2.0's unanswerable
  questions) becomes a stated answer, "The passage does not answer this question.".
- `translation`: source / target, or columns named by `--source-lang` / `--target-lang`
  codes, or a `translation: {code: text}` column; without codes the languages are detected.
- `classification`: text / label; the instruction lists `--labels` (default: the label
  names of a ClassLabel column, else the sorted set of labels seen); marked `is_classification`.
- `summarization`: document / summary.
- `dialogue`: `messages` (OpenAI: role / content) or `conversations` (ShareGPT: from / value,
  human / gpt / system) -> `{"messages": [...]}`. System prompts at the start are kept; empty,
  broken or unknown-role turns are reported and skipped; consecutive turns of one role are
  merged; an assistant turn before any user turn and a user turn with no reply are dropped.

Other kinds write Alpaca records `{instruction, input, output}` with the provenance fields
`source` (input file name), `kind`, `source_row` (1-based row: row 1 is the first record, the
line after a CSV header) and `language`. The instruction phrasing is picked with `--seed`
from a few per kind and language (pipeline/convert_phrasings.py), in the record's language.
A bad row (missing or empty field) is reported with its row number and skipped; a problem
with the whole file (a column it does not have, a file it cannot read) stops before writing.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pipeline import convert_phrasings
from pipeline.config import option, validate, write_resolved_config
from pipeline.errors import UserError
from pipeline.jsonl import check_output_path, claim_outputs, locked_outputs, read_records, write_jsonl_atomic
from pipeline.lang import language_in, language_of

KINDS = ("qa", "translation", "classification", "summarization", "dialogue")

# File suffix -> the `datasets` builder that reads it (and its keyword arguments).
BUILDERS: dict[str, tuple[str, dict]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}

# Local files load as one split; `datasets` names it "train".
LOCAL_SPLIT = "train"

# Role names in OpenAI and ShareGPT logs (and a few exporters' variants) -> chat roles.
ROLES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bot": "assistant",
}

# Merged turns of one role keep their paragraphs apart.
TURN_JOINER = "\n\n"


@dataclass(frozen=True)
class Config:
    kind: Literal["qa", "translation", "classification", "summarization", "dialogue"] = option(
        "qa", "what the input rows are")
    in_path: str = option("", "input file (JSONL, JSON, CSV, TSV or Parquet) or a Hugging Face dataset name",
                          flag="--in")
    out: str = option("", "output JSONL (default: data/converted_KIND.jsonl)")
    split: str = option("train", "split of a Hugging Face dataset (a local file has one split)")
    json_field: str | None = option(None, "for a JSON file whose rows sit under one key, that key")
    seed: int = option(42, "picks each record's instruction phrasing, reproducibly")
    language: Literal["auto", "en", "ja"] = option("auto", "instruction language; auto: each record's own")
    context_column: str = option("context", "qa: the passage column")
    question_column: str = option("question", "qa: the question column")
    answer_column: str = option("answers", "qa: the answer column (SQuAD {'text': [...]} or a string)")
    source_column: str = option("source", "translation: the source-text column")
    target_column: str = option("target", "translation: the target-text column")
    source_lang: str | None = option(None, "translation: source language code (default: detected per row)")
    target_lang: str | None = option(None, "translation: target language code (default: detected per row)")
    text_column: str = option("text", "classification: the text column")
    label_column: str = option("label", "classification: the label column")
    labels: str | None = option(None, "classification: label list separated by commas or 、 (default: labels seen)")
    document_column: str = option("document", "summarization: the document column")
    summary_column: str = option("summary", "summarization: the summary column")
    dialogue_column: str | None = option(None, "dialogue: the turns column (default: messages or conversations)")

    def __post_init__(self):
        validate(self)  # bounds from the field metadata; the rules between fields follow
        if not self.in_path.strip():
            raise UserError("--in: give the file (or dataset name) to convert")
        if not self.out:
            object.__setattr__(self, "out", f"data/converted_{self.kind}.jsonl")
        if self.labels is not None and not self.label_list():
            raise UserError("--labels: give at least one label, separated by commas or 、 (a,b,c or 肯定、否定)")
        if self.kind == "translation" and bool(self.source_lang) != bool(self.target_lang):
            raise UserError("--source-lang/--target-lang: give both language codes, or neither to detect them")

    def label_list(self) -> list[str]:
        return convert_phrasings.split_labels(self.labels)


@dataclass
class Stats:
    out: str
    rows_read: int = 0
    converted: int = 0
    skipped: Counter = field(default_factory=Counter)
    unanswerable: int = 0
    turns_skipped: Counter = field(default_factory=Counter)
    turns_merged: int = 0
    languages: Counter = field(default_factory=Counter)
    seconds: float = 0.0


class BadRow(Exception):
    """One row that cannot be converted; `reason` is its summary key ("empty question")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- reading ----------------------------------------------------------------------------

@contextlib.contextmanager
def open_dataset(cfg: Config) -> Iterator[Any]:
    """The rows of `--in` as a `datasets.Dataset`; UserError naming `--in` if it cannot be read."""
    import datasets

    datasets.disable_progress_bars()
    # Its own error log would repeat, as a second unformatted line, what our UserError says.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    path = Path(cfg.in_path)
    if path.exists():
        if path.is_dir():
            raise UserError(f"--in {path}: is a folder, expected a file")
        builder, kwargs = _builder_for(path)
        if builder == "json" and cfg.json_field:
            kwargs = {**kwargs, "field": cfg.json_field}
        # A throwaway cache: a local file is read once, and a shared cache keyed on path and
        # time would only grow (and could serve a stale copy of an edited file).
        with tempfile.TemporaryDirectory(prefix="convert-cache-") as cache:
            try:
                ds = datasets.load_dataset(builder, data_files=str(path), split=LOCAL_SPLIT, cache_dir=cache, **kwargs)
            except Exception as e:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
                raise UserError(f"--in {path}: cannot read it as {builder}: {_cause(e)}") from None
            yield ds
        return
    if path.suffix.lower() in BUILDERS:
        raise UserError(f"--in {path}: no such file")
    try:
        ds = datasets.load_dataset(cfg.in_path, split=cfg.split)
    except Exception as e:  # network, unknown name, unknown split: all are the user's to fix
        raise UserError(f"--in {cfg.in_path}: not a local file, and loading it as a Hugging Face dataset "
                        f"(split {cfg.split!r}) failed: {_cause(e)}") from None
    yield ds


def _builder_for(path: Path) -> tuple[str, dict]:
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise UserError(f"--in {path}: unknown file type {suffix or '(none)'}; expected one of {', '.join(BUILDERS)}")
    builder, kwargs = BUILDERS[suffix]
    return builder, dict(kwargs)


def _cause(e: BaseException) -> str:
    """The first line of the innermost error: the one that names what was wrong."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _require_column(columns: list[str], name: str, flag: str, source: str) -> str:
    if name not in columns:
        raise UserError(f"{flag}: no column {name!r} in {source} (its columns: {', '.join(columns) or 'none'})")
    return name


# ---- field values -----------------------------------------------------------------------

def text_value(row: dict, column: str) -> str:
    """The stripped text in `row[column]`; BadRow if it is missing, empty or not text."""
    return _as_text(row.get(column), column)


def _as_text(value: Any, name: str) -> str:
    if value is None:
        raise BadRow(f"missing {name}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # CSV columns with a blank cell become floats: 3 -> 3.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRow(f"{name} is not text")
    value = value.strip()
    if not value:
        raise BadRow(f"empty {name}")
    return value


def answer_text(value: Any, column: str) -> str:
    """A QA answer: a string, SQuAD's `{"text": [...]}`, or a list; "" when there is none."""
    if isinstance(value, dict):
        if "text" not in value:
            raise BadRow(f"{column} has no 'text' key")
        value = value["text"]
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _as_text(value, column)  # "How many?" -> 3
    if isinstance(value, list):
        # SQuAD lists several annotators' answers; the first is the reference.
        return next((a.strip() for a in value if isinstance(a, str) and a.strip()), "")
    raise BadRow(f"{column} is not text or SQuAD answers")


# ---- converters: (row) -> record fields, or BadRow -----------------------------------------

class Converter:
    def __init__(self, cfg: Config, columns: list[str], features: dict, source: str, stats: Stats,
                 warn: Callable[[str], None]):
        self.cfg, self.columns, self.features, self.source = cfg, columns, features, source
        self.stats, self.warn = stats, warn
        self.rng = random.Random(cfg.seed)

    def language(self, text: str) -> str:
        # Instruction phrasings exist in English and Japanese; other languages get English ones.
        return language_in(text, ("en", "ja")) if self.cfg.language == "auto" else self.cfg.language

    def instruction(self, kind: str, language: str, **fields) -> str:
        return self.rng.choice(convert_phrasings.INSTRUCTIONS[kind][language]).format(**fields)

    def convert(self, row: dict, row_number: int) -> dict:
        raise NotImplementedError


class QAConverter(Converter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.context = _require_column(self.columns, cfg.context_column, "--context-column", self.source)
        self.question = _require_column(self.columns, cfg.question_column, "--question-column", self.source)
        answer = cfg.answer_column
        if answer == Config.answer_column and answer not in self.columns and "answer" in self.columns:
            answer = "answer"
        self.answer = _require_column(self.columns, answer, "--answer-column", self.source)

    def convert(self, row, row_number):
        context, question = text_value(row, self.context), text_value(row, self.question)
        answer = answer_text(row.get(self.answer), self.answer)
        language = self.language(context + question)
        if not answer:
            answer = convert_phrasings.UNANSWERABLE[language]
            self.stats.unanswerable += 1
        return {"instruction": self.instruction("qa", language),
                "input": convert_phrasings.QA_INPUT[language].format(context=context, question=question),
                "output": answer, "language": language}


class TranslationConverter(Converter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg, columns = self.cfg, self.columns
        self.get_source = self.get_target = None
        if cfg.source_column in columns and cfg.target_column in columns:
            self.get_source = lambda row: text_value(row, cfg.source_column)
            self.get_target = lambda row: text_value(row, cfg.target_column)
        elif cfg.source_lang and cfg.source_lang in columns and cfg.target_lang in columns:
            self.get_source = lambda row: text_value(row, cfg.source_lang)
            self.get_target = lambda row: text_value(row, cfg.target_lang)
        elif cfg.source_lang and "translation" in columns:  # the Hugging Face WMT/OPUS form
            self.get_source = lambda row: self._pair_text(row, cfg.source_lang)
            self.get_target = lambda row: self._pair_text(row, cfg.target_lang)
        else:
            missing = cfg.source_column if cfg.source_column not in columns else cfg.target_column
            flag = "--source-column" if missing == cfg.source_column else "--target-column"
            raise UserError(f"{flag}: no column {missing!r} in {self.source} (its columns: {', '.join(columns)}); "
                            "name the columns, or give --source-lang/--target-lang codes that are column "
                            "names or keys of a 'translation' column")

    @staticmethod
    def _pair_text(row: dict, code: str) -> str:
        pair = row.get("translation")
        if not isinstance(pair, dict):
            raise BadRow("missing translation" if pair is None else "translation is not an object")
        return _as_text(pair.get(code), f"translation.{code}")

    def convert(self, row, row_number):
        source, target = self.get_source(row), self.get_target(row)
        source_code = self.cfg.source_lang or language_of(source)
        target_code = self.cfg.target_lang or language_of(target)
        language = self.language(source)
        return {"instruction": self.instruction("translation", language,
                                                source=convert_phrasings.language_name(source_code, language),
                                                target=convert_phrasings.language_name(target_code, language)),
                "input": source, "output": target, "language": language,
                "source_lang": source_code, "target_lang": target_code}


class ClassificationConverter(Converter):
    def __init__(self, *args, rows=(), **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.text = _require_column(self.columns, cfg.text_column, "--text-column", self.source)
        self.label = _require_column(self.columns, cfg.label_column, "--label-column", self.source)
        # A Hugging Face ClassLabel column stores indices; its names are the real labels.
        self.class_names = list(getattr(self.features.get(self.label), "names", None) or [])
        if cfg.labels is not None:
            self.labels = cfg.label_list()
        elif self.class_names:
            self.labels = self.class_names
        else:
            seen = set()
            for row in rows:
                with contextlib.suppress(BadRow):
                    seen.add(self.label_of(row))
            self.labels = sorted(seen)

    def label_of(self, row: dict) -> str:
        value = row.get(self.label)
        if self.class_names and isinstance(value, int) and 0 <= value < len(self.class_names):
            return self.class_names[value]
        return _as_text(value, self.label)

    def convert(self, row, row_number):
        text, label = text_value(row, self.text), self.label_of(row)
        if label not in self.labels:
            raise BadRow("label not in --labels")
        language = self.language(text)
        joined = convert_phrasings.LABEL_SEPARATOR[language].join(self.labels)
        return {"instruction": self.instruction("classification", language, labels=joined),
                "input": text, "output": label, "language": language, "is_classification": True}


class SummarizationConverter(Converter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.document = _require_column(self.columns, cfg.document_column, "--document-column", self.source)
        self.summary = _require_column(self.columns, cfg.summary_column, "--summary-column", self.source)

    def convert(self, row, row_number):
        document, summary = text_value(row, self.document), text_value(row, self.summary)
        language = self.language(document)
        return {"instruction": self.instruction("summarization", language),
                "input": document, "output": summary, "language": language}


class DialogueConverter(Converter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cfg.dialogue_column:
            self.turn_columns = [_require_column(self.columns, self.cfg.dialogue_column, "--dialogue-column",
                                                 self.source)]
        else:
            # Logs gathered from several tools can hold both forms, one per row.
            self.turn_columns = [c for c in ("messages", "conversations") if c in self.columns]
            if not self.turn_columns:
                raise UserError(f"--dialogue-column: no 'messages' or 'conversations' column in {self.source} "
                                f"(its columns: {', '.join(self.columns)})")

    def convert(self, row, row_number):
        column = next((c for c in self.turn_columns if row.get(c) is not None), self.turn_columns[0])
        turns = row.get(column)
        if isinstance(turns, str):  # a CSV cell holding the turns as JSON
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError:
                raise BadRow(f"{column} is not valid JSON") from None
        if turns is None:
            raise BadRow(f"missing {column}")
        if not isinstance(turns, list):
            raise BadRow(f"{column} is not a list of turns")
        if not turns:
            raise BadRow(f"empty {column}")
        messages = []
        for number, turn in enumerate(turns, start=1):
            try:
                role, content = self.turn(turn)
            except BadRow as e:
                self.skip_turn(row_number, number, e.reason)
                continue
            if role == "system" and any(m["role"] != "system" for m in messages):
                # Chat templates put the system prompt first; one in mid-conversation has no place.
                self.skip_turn(row_number, number, "system turn after the conversation started")
                continue
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += TURN_JOINER + content
                self.stats.turns_merged += 1
                continue
            messages.append({"role": role, "content": content})
        messages = self.trim(messages, row_number)
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("no user turn with an assistant reply")
        language = self.language(" ".join(m["content"] for m in messages if m["role"] == "user"))
        return {"messages": messages, "language": language}

    @staticmethod
    def turn(turn: Any) -> tuple[str, str]:
        if not isinstance(turn, dict):
            raise BadRow("turn is not an object")
        name = turn.get("role", turn.get("from"))
        if not isinstance(name, str):
            raise BadRow("turn has no role")
        role = ROLES.get(name.strip().lower())
        if role is None:
            raise BadRow(f"unknown role {name!r}")
        return role, _as_text(turn.get("content", turn.get("value")), "content")

    def trim(self, messages: list[dict], row_number: int) -> list[dict]:
        """Drop assistant turns before the first user turn and a last user turn with no reply."""
        # Same-role turns are merged already, so at most one assistant turn can lead.
        start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        if start < len(messages) and messages[start]["role"] == "assistant":
            self.skip_turn(row_number, None, "assistant turn before any user turn")
            del messages[start]
        if messages and messages[-1]["role"] == "user":
            self.skip_turn(row_number, None, "user turn with no reply")
            messages.pop()
        return messages

    def skip_turn(self, row_number: int, turn: int | None, reason: str) -> None:
        self.stats.turns_skipped[reason] += 1
        where = f"row {row_number}" + (f" turn {turn}" if turn else "")
        self.warn(f"{self.source} {where}: {reason}; turn skipped")


CONVERTERS = {"qa": QAConverter, "translation": TranslationConverter, "classification": ClassificationConverter,
              "summarization": SummarizationConverter, "dialogue": DialogueConverter}


# ---- the stage --------------------------------------------------------------------------

def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def convert_rows(cfg: Config, rows, columns: list[str], features: dict | None = None, source: str = "",
                 warn: Callable[[str], None] = _warn) -> tuple[list[dict], Stats]:
    """Convert `rows` (any sequence of dicts); the pure core of `run`, with no files involved."""
    from tqdm import tqdm

    stats = Stats(out=cfg.out)
    source = source or Path(cfg.in_path).name or cfg.in_path
    extra = {"rows": rows} if cfg.kind == "classification" else {}
    converter = CONVERTERS[cfg.kind](cfg, list(columns), dict(features or {}), source, stats, warn, **extra)
    records = []
    for row_number, row in enumerate(tqdm(rows, desc=f"convert {cfg.kind}", unit="row", disable=None), start=1):
        stats.rows_read += 1
        try:
            fields = converter.convert(row, row_number)
        except BadRow as e:
            stats.skipped[e.reason] += 1
            warn(f"{source} row {row_number}: {e.reason}; row skipped")
            continue
        language = fields.pop("language")
        records.append({**fields, "source": source, "kind": cfg.kind, "source_row": row_number, "language": language})
        stats.languages[language] += 1
    stats.converted = len(records)
    return records, stats


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    started = time.monotonic()
    out = check_output_path(cfg.out, "--out")
    claim_outputs({"--in": cfg.in_path}, {"--out": out})
    in_path = Path(cfg.in_path)
    if in_path.suffix.lower() == ".jsonl" and in_path.is_file():
        # datasets' errors name a byte position at best; ours name the line, before datasets is even imported.
        for _ in read_records(in_path):
            pass
    with open_dataset(cfg) as ds:
        if len(ds) == 0:
            raise UserError(f"--in {cfg.in_path}: no rows")
        records, stats = convert_rows(cfg, ds, ds.column_names, ds.features)
    if not records:
        reasons = ", ".join(f"{reason} ({n})" for reason, n in stats.skipped.most_common())
        raise UserError(f"--in {cfg.in_path}: none of its {stats.rows_read} rows could be converted: {reasons}; "
                        "nothing was written")
    write_jsonl_atomic(out, records)
    stats.seconds = time.monotonic() - started
    write_resolved_config(cfg, out, {"summary": summarize(stats)})
    print_summary(cfg, stats)
    return stats


def summarize(stats: Stats) -> dict:
    return {"rows_read": stats.rows_read, "converted": stats.converted, "skipped": dict(stats.skipped),
            "unanswerable": stats.unanswerable, "turns_skipped": dict(stats.turns_skipped),
            "turns_merged": stats.turns_merged, "languages": dict(stats.languages),
            "seconds": round(stats.seconds, 2)}


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counter.most_common())


def print_summary(cfg: Config, stats: Stats) -> None:
    lines = [f"convert {cfg.kind}: {stats.rows_read:,} rows read from {cfg.in_path}, {stats.converted:,} converted, "
             f"{sum(stats.skipped.values()):,} skipped -> {stats.out} ({stats.seconds:.1f} s)"]
    if stats.skipped:
        lines.append(f"  skipped rows: {_counts(stats.skipped)}")
    if stats.unanswerable:
        lines.append(f"  unanswerable questions given the stated answer: {stats.unanswerable:,}")
    if stats.turns_skipped or stats.turns_merged:
        lines.append(f"  turns skipped: {_counts(stats.turns_skipped) or 'none'}; same-role turns merged: "
                     f"{stats.turns_merged:,}")
    lines.append(f"  languages: {_counts(stats.languages)}")
    print("\n".join(lines))
