"""JSONL reading, validation and crash-safe writing, shared by every stage.

- `read_records` streams a file and stops at the first bad record with
  `path:LINE: field: what is wrong` (an InputError, which the CLI prints as one line, exit 2).
- `atomic_write` / `write_jsonl_atomic` / `write_json_atomic`: whole-file outputs go to a
  temporary file in the same folder and replace the target with `os.replace`, so a crash
  leaves the old file or the new one, never half of either.
- `AppendLog`: append-mode outputs of resumable stages, flushed per record. On reopen a torn
  last line (no newline, or not JSON) is reported, cut off, and the rest is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.errors import InputError, UserError

# One record over this size is almost surely a broken export, not a training example, and
# reading it would hold the whole line in memory for nothing.
MAX_RECORD_BYTES = 1 << 20  # 1 MiB

JSON_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
                   list: "a list", dict: "an object"}

# A field spec: field name -> (expected type or tuple of types, required, must be non-empty)
FieldSpec = dict[str, tuple[Any, bool, bool]]

INSTRUCTION_FIELDS: FieldSpec = {
    "instruction": (str, True, True),
    "input": (str, False, False),
    "output": (str, False, False),
    "id": ((str, int), False, True),
}


def _type_name(expected) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(JSON_TYPE_NAMES.get(t, t.__name__) for t in types)


def check_fields(record: Any, spec: FieldSpec, path, line: int) -> dict:
    """Return `record` if it matches `spec`, else raise InputError naming the field."""
    if not isinstance(record, dict):
        raise InputError(path, line, None, f"expected a JSON object, got {type(record).__name__}")
    for name, (expected, required, nonempty) in spec.items():
        if name not in record or record[name] is None:
            if required:
                raise InputError(path, line, name, "missing")
            continue
        value = record[name]
        # bool is an int in Python; a JSON true is never a valid count or id.
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in _as_tuple(expected)):
            raise InputError(path, line, name, f"expected {_type_name(expected)}, got {json.dumps(value, ensure_ascii=False)[:60]}")
        if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
            raise InputError(path, line, name, "empty")
    return record


def _as_tuple(expected) -> tuple:
    return expected if isinstance(expected, tuple) else (expected,)


def read_records(path, spec: FieldSpec | None = None,
                 validate: Callable[[dict, int], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)` for each non-blank line; raise InputError on the first bad one.

    `spec` checks fields and types; `validate(record, line)` can add checks of its own and
    raise InputError. A UTF-8 BOM and blank lines are tolerated.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a JSONL file")
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if len(raw) > MAX_RECORD_BYTES:
                raise InputError(path, line_number, None, f"line is {len(raw):,} bytes, over the {MAX_RECORD_BYTES:,}-byte limit for one record")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(path, line_number, None, f"invalid UTF-8 at byte {e.start}") from None
            if line_number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(path, line_number, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if spec is not None:
                check_fields(record, spec, path, line_number)
            elif not isinstance(record, dict):
                raise InputError(path, line_number, None, f"expected a JSON object, got {type(record).__name__}")
            if validate is not None:
                validate(record, line_number)
            yield line_number, record


def load_records(path, spec: FieldSpec | None = None, *, allow_empty: bool = False,
                 validate: Callable[[dict, int], None] | None = None) -> list[dict]:
    """Read and validate a whole file before any output is written."""
    records = [record for _, record in read_records(path, spec, validate)]
    if not records and not allow_empty:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def dumps(record: dict) -> str:
    """One JSONL line (without the newline): UTF-8 as is, so Japanese stays readable."""
    return json.dumps(record, ensure_ascii=False)


@contextlib.contextmanager
def atomic_write(path, mode: str = "w") -> Iterator[Any]:
    """Write to a temporary file beside `path`, then `os.replace` it; on error the old file stays."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have, or
    # the old file's, so replacing an output never changes who can read it.
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_current_umask())
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl_atomic(path, records: Iterable[dict]) -> int:
    count = 0
    with atomic_write(path) as f:
        for record in records:
            f.write(dumps(record) + "\n")
            count += 1
    return count


def write_json_atomic(path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def path_beside(output, suffix: str) -> Path:
    """A file that belongs to `output`: `data/x.jsonl` + `rejected.jsonl` -> `data/x.rejected.jsonl`."""
    output = Path(output)
    return output.with_name(output.name.rsplit(".", 1)[0] + "." + suffix)


def rejected_path_for(out) -> Path:
    """Where a stage puts the records it turned down: `data/x.jsonl` -> `data/x.rejected.jsonl`."""
    return path_beside(out, "rejected.jsonl")


def check_output_path(path, flag: str) -> Path:
    """Fail early, naming the flag, if `path` cannot be written: before any work is done."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file path")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot write there (permission denied)")
    return path


def check_output_folder(path, flag: str) -> Path:
    """Fail early, naming the flag, if folder `path` cannot be made or written (missing parents are fine)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {existing} (permission denied)")
    return path


class AppendLog:
    """An append-only JSONL output that survives `kill -9`: one flushed line per record.

    Opening it reads the records already there (`.records`) so a stage can resume; a torn
    last line, left by a crash mid-write, is cut off with a warning. A bad line anywhere
    else is real corruption and stops with an InputError rather than guessing.
    """

    def __init__(self, path, spec: FieldSpec | None = None, warn: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.records: list[dict] = []
        self.torn_bytes = 0
        if self.path.exists():
            self.records, self.torn_bytes = recover_tail(self.path, spec, warn or _warn)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(dumps(record) + "\n")
        self._file.flush()
        self.records.append(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def recover_tail(path, spec: FieldSpec | None, warn: Callable[[str], None]) -> tuple[list[dict], int]:
    """Read an append log; truncate a torn last line in place. Returns (records, bytes cut)."""
    path = Path(path)
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
    tail = data[good_end:]
    torn = bool(tail.strip())
    body = data[:good_end]
    # A last line can end in a newline and still be cut mid-JSON when a writer died between
    # the two writes of a non-atomic print; check the last complete line parses.
    lines = body.split(b"\n")[:-1]
    if lines and lines[-1].strip():
        try:
            json.loads(lines[-1].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            good_end -= len(lines[-1]) + 1
            torn = True
    if torn or good_end < len(data):
        cut = len(data) - good_end
        warn(f"{path}: last line was cut off by an interrupted write ({cut} bytes); removed it, keeping the {good_end:,} bytes before it")
        with open(path, "r+b") as f:
            f.truncate(good_end)
    else:
        cut = 0
    records = [record for _, record in read_records(path, spec)]
    return records, cut
