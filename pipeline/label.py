"""`python -m pipeline label data/preferences.jsonl`: a person picks the better answer of each pair.

The H in RLHF. Each pair is shown in the terminal: the instruction and its input, then the two
answers as [1] and [2] in an order drawn at random for that pair (seeded by `--seed` and the
pair's id, so a rerun shows the same order): never the judge's choice first by construction,
and the judge's scores and reasons are not shown, so neither can sway the person. Then a key,
and Enter:

    1 / 2   this answer is better        t   they are equally good (or bad)
    s       skip: decide later (shown again with --revisit-skipped)        q   quit

Full-width keys (１, ２, ｔ, typed with a Japanese input method on) count the same. Any other key
is asked again; the end of input (Ctrl-D, or the end of a piped file) stops like `q`.

Each choice is appended at once to `data/preferences.labels.jsonl` (`--out`; the record is
described in `pipeline/preferences.py`), so quitting, Ctrl-C or a crash loses nothing and a
rerun continues with the pairs not labelled yet. A pair whose answers changed since it was
labelled (prefs was rerun) is asked again. The summary gives the judge's agreement with the
person: the share of the pairs where the person preferred one answer in which it is the
judge's `chosen`. `prefs --labels FILE` then makes these choices override the judge's.

Keys are read a line at a time from standard input, so a script or a test can drive it:
`printf '1\\n2\\nq\\n' | python -m pipeline label data/preferences.jsonl`.
"""

from __future__ import annotations

import random
import sys
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TextIO

from pipeline.config import option
from pipeline.jsonl import AppendLog, check_output_path, claim_outputs, locked_outputs, read_records
from pipeline.preferences import (LABEL_FIELDS, Agreement, agreement, answer_text, check_label, current_labels,
                                  judge_order, labels_path_for, load_pairs, make_label, question_text)

# What each key means; "1" and "2" are the answers in the order shown.
KEYS = {"1": "first", "2": "second", "t": "tie", "s": "skip", "q": "quit"}
PROMPT = "better answer? 1 / 2, t = tie, s = skip, q = quit: "
RULE_WIDTH = 60  # characters of the line between pairs: fits an 80-column terminal
INDENT = "    "
PERCENT = 100


@dataclass(frozen=True)
class Config:
    file: str = option("data/preferences.jsonl", "the preference pairs to label (what prefs writes)", positional=True)
    out: str | None = option(None, "where the choices are appended (default: FILE's name with .labels.jsonl, "
                                   "e.g. data/preferences.labels.jsonl)")
    seed: int = option(0, "random seed for which answer of a pair is shown first")
    revisit_skipped: bool = option(False, "show the pairs skipped in an earlier session again")


@dataclass
class LabelStats:
    labelled: int = 0  # choices made in this session (ties and skips included)
    total: int = 0  # pairs in the file
    left: int = 0  # pairs still without a choice (skipped ones included) when the session ended
    stale: int = 0  # earlier labels whose pair has changed since: asked again
    quit: bool = False  # stopped by q or the end of input before the last pair
    agreement: Agreement | None = None  # over every current label of the file, not just this session's


def shown_first(seed: int, pair: dict) -> str:
    """Which answer the person sees as [1]: 'chosen' or 'rejected', a fair coin per pair, stable across reruns."""
    # A str seed is hashed with SHA-512 by `random`, so the draw is the same in every process.
    return "chosen" if random.Random(f"{seed}\0{pair['id']}").random() < 0.5 else "rejected"


def read_key(keys: TextIO, screen: TextIO) -> str | None:
    """The next valid key, asking again after a wrong one; None at the end of input."""
    while True:
        screen.write(PROMPT)
        screen.flush()
        line = keys.readline()
        if not line:
            screen.write("\n")
            return None
        if not keys.isatty():  # piped keys are not echoed by a terminal: show them, so the transcript reads right
            screen.write(line if line.endswith("\n") else line + "\n")
        key = unicodedata.normalize("NFKC", line).strip().lower()
        if key in KEYS:
            return key
        screen.write(f"{line.strip()!r} is not a key here: type 1, 2, t, s or q, then Enter\n")


def show_pair(pair: dict, first: str, position: int, count: int, screen: TextIO) -> None:
    instruction, given = question_text(pair)
    second = "rejected" if first == "chosen" else "chosen"
    parts = ["", "-" * RULE_WIDTH, f"pair {position} of {count} (id {pair['id']})", "", "Instruction:", _indent(instruction)]
    if given.strip():
        parts += ["", "Input:", _indent(given)]
    for number, name in (("1", first), ("2", second)):
        parts += ["", f"[{number}]", _indent(answer_text(pair[name]))]
    screen.write("\n".join(parts) + "\n\n")


def _indent(text: str) -> str:
    return "\n".join(INDENT + line for line in (text.splitlines() or [""]))


def choice_for(key: str, first: str) -> str:
    """The label's choice for a key: which of the judge's answers the person preferred."""
    if key == "1":
        return first
    if key == "2":
        return "rejected" if first == "chosen" else "chosen"
    return KEYS[key]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@locked_outputs
def run(cfg: Config, *, keys: TextIO | None = None, screen: TextIO | None = None) -> LabelStats:
    """Label the pairs of `cfg.file` not labelled yet, reading keys from `keys` (standard input)."""
    keys = _readable(sys.stdin) if keys is None else keys
    screen = _readable(sys.stdout) if screen is None else screen
    pairs = [judge_order(pair) for pair in load_pairs(cfg.file)]  # labels name the judge's answers
    out = check_output_path(cfg.out or labels_path_for(cfg.file), "--out")
    claim_outputs({"FILE": cfg.file}, {"--out": out})
    with AppendLog(out, LABEL_FIELDS) as log:
        for line, record in read_records(out):  # the log's own check names no line; this one does
            check_label(record, line, out)
        current, stale = current_labels(pairs, log.records)
        done = {pair_id for pair_id, label in current.items() if label["choice"] != "skip" or not cfg.revisit_skipped}
        todo = [pair for pair in pairs if pair["id"] not in done]
        stats = LabelStats(total=len(pairs), stale=stale)
        if stale:
            screen.write(f"{stale} earlier label(s) in {out} are for answers that have changed since: asked again\n")
        if not todo:
            screen.write(f"every pair in {cfg.file} has a choice already (in {out})\n")
        for position, pair in enumerate(todo, start=1):
            first = shown_first(cfg.seed, pair)
            show_pair(pair, first, position, len(todo), screen)
            key = read_key(keys, screen)
            if key is None or KEYS[key] == "quit":
                stats.quit = True
                break
            log.write(make_label(pair, choice_for(key, first), first, _now()))
            current[pair["id"]] = log.records[-1]
            stats.labelled += 1
        stats.left = sum(1 for pair in pairs if current.get(pair["id"], {}).get("choice", "skip") == "skip")
        stats.agreement = agreement(current.values())
    screen.write("\n" + summary(stats, out) + "\n")
    return stats


def _readable(stream: TextIO) -> TextIO:
    """The terminal's stream, made unable to crash on text it cannot encode (Japanese on an ASCII terminal)."""
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="backslashreplace" if stream is not sys.stdin else "replace")
    return stream


def summary(stats: LabelStats, out) -> str:
    agree = stats.agreement or Agreement()
    lines = [f"labelled {stats.labelled} pair(s) this session; {stats.total - stats.left} of {stats.total} "
             f"have a choice, {stats.left} left (choices in {out})"]
    if agree.compared:
        lines.append(f"the judge agreed with you on {agree.agreed} of the {agree.compared} pair(s) where you "
                     f"preferred one answer ({PERCENT * agree.share:.0f}%); {agree.ties} tie(s), {agree.skipped} skipped")
    else:
        lines.append(f"no pair where you preferred one answer yet; {agree.ties} tie(s), {agree.skipped} skipped")
    if stats.quit and stats.left:
        lines.append("rerun the same command to continue where you stopped")
    if agree.skipped:
        lines.append(f"--revisit-skipped shows the {agree.skipped} skipped pair(s) again")
    return "\n".join(lines)
