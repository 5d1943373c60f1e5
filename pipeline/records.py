"""What a training record is, and what a training run leaves for the stages after it.

One checker, `check_training_record`, decides whether a JSONL record can be trained on:
`finetune` calls it on every line it reads, `mix` on every file it merges (so nothing it writes
fails in `finetune` later), and `eval` on its held-out records (which also need the reference
answer last). Two shapes are accepted:

- Alpaca: `instruction` (non-empty string), optional `input` (string), `output` (string).
- Chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` with at
  least one user turn and one assistant turn (the loss is on the assistant turns).

`TRAIN_CONFIG` is the file `finetune` writes into its output folder and `eval` reads back:
`{"stage": "finetune", "config": {... every flag ..., "template": "alpaca"|"chat",
"max_length": int}, "base_model": str, ...}`. `train_settings` is the reader; old files with
`template` / `max_length` at the top level are read too.

Nothing here imports torch: `mix` and `eval --predictions` stay light.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError, UserError
from pipeline.jsonl import FieldSpec, check_fields

TRAIN_CONFIG = "train_config.json"  # written by `finetune` into its output folder, read by `eval`
# What eval takes from a run when its own flags do not say: the prompt format and the length.
TRAIN_SETTINGS = ("template", "max_length")

CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = "chat"  # the only template that can express a `messages` conversation

ALPACA_RECORD: FieldSpec = {
    "instruction": (str, True, True),
    "input": (str, False, False),
    "output": (str, True, False),
}
TURN: FieldSpec = {"role": (str, True, True), "content": (str, True, False)}


def check_training_record(record: dict, line: int, path, template: str | None = None,
                          reference_last: bool = False) -> None:
    """Raise InputError (`path:line: field: problem`) unless `record` can be trained on.

    `template`: the template it will be rendered with; only `chat` (or None: not decided yet)
    takes `messages`. `reference_last`: the last turn must be the assistant's, because it is
    the answer a prediction is scored against (eval).
    """
    if "messages" not in record:
        check_fields(record, ALPACA_RECORD, path, line)
        return
    if template not in (None, CHAT_TEMPLATE):
        raise InputError(path, line, "messages", "chat records need --template chat")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise InputError(path, line, "messages", "expected a non-empty list of {role, content} turns")
    check_turns(messages, "messages", path, line, CHAT_ROLES)
    if reference_last and messages[-1]["role"] != "assistant":
        raise InputError(path, line, "messages", "the last turn must be the assistant's (it is the reference answer)")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise InputError(path, line, "messages", "no assistant turn to train on")
    if not any(turn["role"] == "user" for turn in messages):
        raise InputError(path, line, "messages", "no user turn")


def training_record_validator(path, template: str | None = None, reference_last: bool = False):
    """`check_training_record` as a `read_records(validate=...)` callback for one file."""
    def validate(record: dict, line: int) -> None:
        check_training_record(record, line, path, template, reference_last)
    return validate


def train_settings(model_dir) -> dict:
    """template and max_length recorded by `finetune` in a model folder (empty when absent)."""
    path = Path(model_dir) / TRAIN_CONFIG
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    nested = data.get("config") if isinstance(data.get("config"), dict) else {}
    found = {key: data.get(key, nested.get(key)) for key in TRAIN_SETTINGS}
    return {key: value for key, value in found.items() if value is not None}


def check_turns(turns: list, name: str, path, line: int, roles: tuple[str, ...] = CHAT_ROLES) -> None:
    """Each turn of a conversation is `{"role", "content"}` with a role from `roles`; errors name
    the turn (`messages[2].role`). Training records and preference pairs both hold conversations."""
    for number, turn in enumerate(turns):
        where = f"{name}[{number}]"
        if not isinstance(turn, dict):
            raise InputError(path, line, where, 'expected {"role": str, "content": str}')
        try:
            check_fields(turn, TURN, path, line)
        except InputError as e:
            raise InputError(path, line, f"{where}.{e.field}", e.problem) from None
        if turn["role"] not in roles:
            raise InputError(path, line, f"{where}.role", f"{turn['role']!r} is not one of {', '.join(roles)}")
