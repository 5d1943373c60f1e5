"""What a preference pair is, what a person's label is, and how labels override the judge.

Shared by `prefs` (writes pairs), `label` (a person's choices) and `dpo` (trains on pairs);
it imports no stage and no torch.

## A pair (one JSONL line): TRL's preference format plus provenance

Standard form (`--format alpaca`, the default): `prompt` is the Alpaca prompt as `finetune`
renders it (`templates.alpaca_prompt`), `chosen` / `rejected` the two answers as text:

    {"id": "pair-0007", "prompt": "Below is an instruction ... ### Response:",
     "chosen": "東京です。", "rejected": "大阪です。",
     "instruction": "日本の首都はどこですか。", "input": "",
     "scores": {"chosen": 4.6, "rejected": 2.1}, "margin": 2.5,
     "reasons": {"chosen": "...", "rejected": "..."},
     "models": {"policy": "runs/sft", "judge": "gpt-4o-mini"}, "label_source": "judge"}

Conversational form (`--format messages`): `prompt` is `[{"role": "user", "content": ...}]`
(instruction, a blank line, input: `templates.user_text`), `chosen` and `rejected` are
`[{"role": "assistant", "content": ...}]`. Both forms load in `datasets` and train in TRL's
DPOTrainer unchanged: it reads `prompt` / `chosen` / `rejected` and ignores the rest.

`id`, `prompt`, `chosen` and `rejected` are required (labels are keyed on `id`); the rest is
provenance, type-checked when present. `scores` and `reasons` follow the answers, so after a
person overrides the judge, `scores.chosen` is still the judge's score of the answer now
chosen and `margin` (`scores.chosen - scores.rejected`) is negative: the judge disagreed.
`label_source` is `judge` or `human`; `judge_agreed` (with `human`) says whether the person
picked the judge's choice.

## A label (one line of `data/preferences.labels.jsonl`, written by `label`)

    {"id": "pair-0007", "pair": "<16 hex digits>", "choice": "chosen" | "rejected" | "tie" | "skip",
     "shown_first": "chosen" | "rejected", "time": "2026-01-01T00:00:00+00:00"}

`choice` names the judge's answer the person preferred (`chosen`: the judge's pick too).
`pair` is `pair_key` of the pair as it was shown: a hash of its prompt and both answers in the
judge's order, so a label never applies to a pair whose answers changed or were swapped since
(prefs rerun with another policy or judge); such a label is stale and the pair is asked again.
For one id the last label wins.

## `apply_labels`: a person's choice overrides the judge's

`chosen` keeps the pair, `rejected` swaps its answers; both mark it `label_source: human`
(pairs already labelled are read in the judge's order first, `judge_order`, so applying the
same labels twice gives the same file). A
human tie drops the pair (returned with `reason: human_tie`, for the rejected file), because
DPO on a pair the person calls equal would push the model toward one answer for no reason;
that is also what the judge's own ties get in `prefs`. `skip` leaves the judge's pair as it is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pipeline.errors import InputError
from pipeline.jsonl import FieldSpec, check_fields, load_records, path_beside
from pipeline.records import check_turns
from pipeline.templates import alpaca_prompt, user_text

FORMATS = ("alpaca", "messages")  # the same names as respond's --format
LABEL_SOURCES = ("judge", "human")
CHOICES = ("chosen", "rejected", "tie", "skip")
ANSWERS = ("chosen", "rejected")
HUMAN_TIE = "human_tie"  # the reason a pair a person called a tie is dropped
PAIR_KEY_CHARS = 16  # hex digits of the SHA-256: collisions are not a concern at any data size
PROMPT_ROLES = ("system", "user", "assistant")
NUMBER = (int, float)

PAIR_FIELDS: FieldSpec = {
    "id": ((str, int), True, True),
    "prompt": ((str, list), True, True),
    "chosen": ((str, list), True, False),
    "rejected": ((str, list), True, False),
    "instruction": (str, False, True),
    "input": (str, False, False),
    "scores": (dict, False, False),
    "margin": (NUMBER, False, False),
    "reasons": (dict, False, False),
    "models": (dict, False, False),
    "label_source": (str, False, True),
    "judge_agreed": (bool, False, False),
}
SCORE_FIELDS: FieldSpec = {"chosen": (NUMBER, True, False), "rejected": (NUMBER, True, False)}
REASON_FIELDS: FieldSpec = {"chosen": (str, False, False), "rejected": (str, False, False)}
LABEL_FIELDS: FieldSpec = {
    "id": ((str, int), True, True),
    "pair": (str, True, True),
    "choice": (str, True, True),
    "shown_first": (str, False, True),
    "time": (str, False, False),
}


def labels_path_for(pairs_path) -> Path:
    """`data/preferences.jsonl` -> `data/preferences.labels.jsonl`: where `label` writes by default."""
    return path_beside(pairs_path, "labels.jsonl")


# --- building and reading pairs ---------------------------------------------------------------

def make_pair(pair_id: str | int, instruction: str, input_text: str, chosen: str, rejected: str, *,
              fmt: str = "alpaca", scores: dict | None = None, reasons: dict | None = None,
              models: dict | None = None, label_source: str = "judge") -> dict:
    """One pair record in the standard (`alpaca`) or conversational (`messages`) form."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown pair format {fmt!r}; expected one of {', '.join(FORMATS)}")
    source = {"instruction": instruction, "input": input_text}
    if fmt == "alpaca":
        record = {"id": pair_id, "prompt": alpaca_prompt(source), "chosen": chosen, "rejected": rejected}
    else:
        record = {"id": pair_id, "prompt": [{"role": "user", "content": user_text(source)}],
                  "chosen": [{"role": "assistant", "content": chosen}],
                  "rejected": [{"role": "assistant", "content": rejected}]}
    record.update(instruction=instruction, input=input_text)
    if scores is not None:
        record["scores"] = {"chosen": scores["chosen"], "rejected": scores["rejected"]}
        record["margin"] = scores["chosen"] - scores["rejected"]
    if reasons is not None:
        record["reasons"] = {"chosen": reasons.get("chosen", ""), "rejected": reasons.get("rejected", "")}
    if models is not None:
        record["models"] = dict(models)
    record["label_source"] = label_source
    return record


def pair_format(record: dict) -> str:
    return "alpaca" if isinstance(record["prompt"], str) else "messages"


def training_records(record: dict) -> tuple[dict, dict]:
    """The chosen and the rejected answer as training records, for `templates.encode_example`.

    So DPO renders and masks a pair exactly as `finetune` does a record: the conversational form
    becomes `{"messages": prompt + answer}`; the standard form becomes an Alpaca record from
    `instruction` and `input` (its `prompt` is the Alpaca rendering of those, and rendering
    them again lets `--template chat` work too). A standard pair without `instruction` (from
    another tool) has only its prompt text, which no template can re-render: ValueError.
    """
    if pair_format(record) == "messages":
        return tuple({"messages": [*record["prompt"], *record[name]]} for name in ANSWERS)
    if not record.get("instruction"):
        raise ValueError(f"pair {record['id']!r}: a standard-form pair needs `instruction` to be rendered by a template")
    return tuple({"instruction": record["instruction"], "input": record.get("input") or "", "output": record[name]}
                 for name in ANSWERS)


def answer_text(value: str | list) -> str:
    """An answer as text: the string itself, or the content of its assistant turns."""
    if isinstance(value, str):
        return value
    return "\n\n".join(turn["content"] for turn in value)


def question_text(record: dict) -> tuple[str, str]:
    """(instruction, input) to show a person: the record's own, or what its prompt says."""
    if record.get("instruction"):
        return record["instruction"], record.get("input") or ""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt, ""
    return "\n\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt), ""


def judge_order(record: dict) -> dict:
    """The pair as the judge gave it: a pair a person overrode (`judge_agreed: false`) is swapped back.

    Labels name the judge's answers, so `label` shows and `apply_labels` reads every pair in this
    order: labelling or applying labels to a file that already carries a person's choices gives
    the same result as on the judge's file.
    """
    if record.get("label_source") != "human":
        return record
    out = swapped(record) if record.get("judge_agreed") is False else dict(record)
    out.pop("judge_agreed", None)
    out["label_source"] = "judge"
    return out


def pair_key(record: dict) -> str:
    """A hash of the prompt and both answers, in the judge's order (see the module docstring)."""
    record = judge_order(record)
    content = json.dumps([record["prompt"], record["chosen"], record["rejected"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:PAIR_KEY_CHARS]


def check_pair(record: dict, line: int, path) -> None:
    """Raise InputError (`path:line: field: problem`) unless `record` is a pair `label` and `dpo` can use."""
    check_fields(record, PAIR_FIELDS, path, line)
    conversational = isinstance(record["prompt"], list)
    if conversational:
        _check_turns(record["prompt"], "prompt", path, line, PROMPT_ROLES)
        if record["prompt"][-1]["role"] != "user":
            raise InputError(path, line, "prompt", "the last turn must be the user's (the answers reply to it)")
    for name in ANSWERS:
        if isinstance(record[name], list) != conversational:
            want = "a list of assistant turns, as prompt is a list" if conversational else "a string, as prompt is"
            raise InputError(path, line, name, f"expected {want}")
        if conversational:
            _check_turns(record[name], name, path, line, ("assistant",))
    if answer_text(record["chosen"]) == answer_text(record["rejected"]):
        raise InputError(path, line, "rejected", "the same answer as chosen: there is nothing to prefer")
    _check_nested(record, "scores", SCORE_FIELDS, path, line)
    _check_nested(record, "reasons", REASON_FIELDS, path, line)
    for key, value in (record.get("models") or {}).items():
        if not isinstance(value, str):
            raise InputError(path, line, f"models.{key}", f"expected a string, got {json.dumps(value, ensure_ascii=False)[:60]}")
    if record.get("label_source") is not None and record["label_source"] not in LABEL_SOURCES:
        raise InputError(path, line, "label_source", f"{record['label_source']!r} is not one of {', '.join(LABEL_SOURCES)}")


def _check_turns(turns: list, name: str, path, line: int, roles: tuple[str, ...]) -> None:
    if not turns:
        raise InputError(path, line, name, "expected at least one {role, content} turn")
    check_turns(turns, name, path, line, roles)


def _check_nested(record: dict, name: str, spec: FieldSpec, path, line: int) -> None:
    if record.get(name) is None:
        return
    try:
        check_fields(record[name], spec, path, line)
    except InputError as e:
        raise InputError(path, line, f"{name}.{e.field}" if e.field else name, e.problem) from None


def load_pairs(path) -> list[dict]:
    """Every pair in a file, checked, with no id twice (labels are keyed on it)."""
    seen: dict = {}

    def validate(record: dict, line: int) -> None:
        check_pair(record, line, path)
        if record["id"] in seen:
            raise InputError(path, line, "id", f"{record['id']!r} is also the id of line {seen[record['id']]}")
        seen[record["id"]] = line

    return load_records(path, validate=validate)


# --- labels -------------------------------------------------------------------------------------

def make_label(pair: dict, choice: str, shown_first: str, time: str) -> dict:
    if choice not in CHOICES:
        raise ValueError(f"unknown choice {choice!r}; expected one of {', '.join(CHOICES)}")
    return {"id": pair["id"], "pair": pair_key(pair), "choice": choice, "shown_first": shown_first, "time": time}


def check_label(record: dict, line: int, path) -> None:
    check_fields(record, LABEL_FIELDS, path, line)
    if record["choice"] not in CHOICES:
        raise InputError(path, line, "choice", f"{record['choice']!r} is not one of {', '.join(CHOICES)}")
    if record.get("shown_first") is not None and record["shown_first"] not in ANSWERS:
        raise InputError(path, line, "shown_first", f"{record['shown_first']!r} is not one of {', '.join(ANSWERS)}")


def latest_labels(labels: Iterable[dict]) -> dict:
    """id -> the last label given for it (a later session's label replaces an earlier one)."""
    return {label["id"]: label for label in labels}


def current_labels(pairs: Iterable[dict], labels: Iterable[dict]) -> tuple[dict, int]:
    """(id -> label, for labels that still match their pair; how many labels are stale)."""
    keys = {pair["id"]: pair_key(pair) for pair in pairs}
    latest = latest_labels(labels)
    current = {pair_id: label for pair_id, label in latest.items() if keys.get(pair_id) == label["pair"]}
    return current, len(latest) - len(current)


@dataclass
class Agreement:
    agreed: int = 0  # the person chose the judge's chosen answer
    compared: int = 0  # pairs where the person preferred one answer (no tie, no skip)
    ties: int = 0
    skipped: int = 0

    @property
    def share(self) -> float | None:
        return self.agreed / self.compared if self.compared else None


def agreement(labels: Iterable[dict]) -> Agreement:
    """How often the judge's choice matches the person's, over labels that prefer one answer."""
    result = Agreement()
    for label in labels:
        choice = label["choice"]
        if choice in ANSWERS:
            result.compared += 1
            result.agreed += choice == "chosen"
        elif choice == "tie":
            result.ties += 1
        else:
            result.skipped += 1
    return result


def swapped(record: dict) -> dict:
    """The pair with its answers exchanged; scores and reasons stay with their answers."""
    out = dict(record)
    out["chosen"], out["rejected"] = record["rejected"], record["chosen"]
    for name in ("scores", "reasons"):
        if isinstance(record.get(name), dict):
            out[name] = {"chosen": record[name].get("rejected"), "rejected": record[name].get("chosen")}
    if isinstance(record.get("scores"), dict):
        out["margin"] = out["scores"]["chosen"] - out["scores"]["rejected"]
    return out


@dataclass
class LabelledPairs:
    pairs: list[dict] = field(default_factory=list)  # to train on, in the input's order
    dropped: list[dict] = field(default_factory=list)  # human ties, each with `reason: human_tie`
    confirmed: int = 0  # the person agreed with the judge
    overridden: int = 0  # the person chose the judge's rejected answer: the pair was swapped
    stale: int = 0  # labels for pairs whose answers changed since, or that are gone: not applied


def apply_labels(pairs: Iterable[dict], labels: Iterable[dict]) -> LabelledPairs:
    """Override the judge with a person's choices (see the module docstring). Pure: inputs are not changed."""
    pairs = [judge_order(pair) for pair in pairs]
    current, stale = current_labels(pairs, labels)
    result = LabelledPairs(stale=stale)
    for pair in pairs:
        label = current.get(pair["id"])
        choice = label["choice"] if label else "skip"
        if choice == "tie":
            result.dropped.append({**pair, "label_source": "human", "reason": HUMAN_TIE})
        elif choice == "skip":
            result.pairs.append(pair)
        else:
            agreed = choice == "chosen"
            result.confirmed += agreed
            result.overridden += not agreed
            result.pairs.append({**(pair if agreed else swapped(pair)), "label_source": "human", "judge_agreed": agreed})
    return result
