"""JSONL reading, validation and crash-safe writing, shared by every stage.

- `read_records` streams a file and stops at the first bad record with
  `path:LINE: field: what is wrong` (an InputError, which the CLI prints as one line, exit 2).
- `atomic_write` / `write_jsonl_atomic` / `write_json_atomic`: whole-file outputs go to a
  temporary file in the same folder and replace the target with `os.replace`, so a crash
  leaves the old file or the new one, never half of either.
  A symlinked output has its target written (the link stays); a device or FIFO (`--out
  /dev/null`) is written in place, never replaced by a regular file.
- `AppendLog`: append-mode outputs of resumable stages, one `os.write` per record. On reopen a
  torn last line (one that does not parse) is reported, cut off, and the rest is kept; a complete
  last record that only lacks its newline is kept. A full disk cuts back to the last whole record
  and stops with one line (`DiskFull`), so a rerun resumes.
- The rules about which files an output has beside it, the check that no output is an input, and
  the lock on each output live in `pipeline/outputs.py` (re-exported here for the stages).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.errors import NO_SPACE_ERRNOS, DiskFull, InputError, UserError
# Re-exported: stages import the rules about their output files from here, beside the writers.
from pipeline.outputs import (check_output_folder, check_output_path, check_outputs_apart, claim_outputs,  # noqa: F401
                              config_path_for, is_special, lock_path_for, locked_outputs, output_lock, path_beside,
                              rejected_path_for)

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
            record = parse_line(text, path, line_number)
            if spec is not None:
                check_fields(record, spec, path, line_number)
            elif not isinstance(record, dict):
                raise InputError(path, line_number, None, f"expected a JSON object, got {type(record).__name__}")
            if validate is not None:
                validate(record, line_number)
            yield line_number, record


class _NonFinite:
    """Stands in for a NaN or Infinity while a line is parsed, so the field holding it can be named."""

    def __init__(self, word: str):
        self.word = word


def parse_line(text: str, path, line: int) -> Any:
    """One JSON value, or InputError naming `path:line` (and the field, for NaN and Infinity).

    Python's json accepts NaN and Infinity, which no other JSON reader does and which would train
    garbage; a 5,000-digit integer or a thousand nested lists raise ValueError or RecursionError.
    """
    try:
        value = json.loads(text, parse_constant=_NonFinite)
    except json.JSONDecodeError as e:
        raise InputError(path, line, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(path, line, None, "nested too deeply to be a record") from None
    except ValueError as e:  # int('1' * 5000): over sys.get_int_max_str_digits()
        raise InputError(path, line, None, f"a number too long to read ({e})") from None
    try:
        where = _non_finite_field(value)
    except RecursionError:
        raise InputError(path, line, None, "nested too deeply to be a record") from None
    if where is not None:
        field, word = where
        raise InputError(path, line, field or None, f"{word} is not a number JSON allows (write null, or a finite number)")
    return value


def _non_finite_field(value: Any, where: str = "") -> tuple[str, str] | None:
    if isinstance(value, _NonFinite):
        return where, value.word
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite_field(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key)
        if found is not None:
            return found
    return None


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
    """Write to a temporary file beside `path`, then `os.replace` it; on error the old file stays.

    A symlink's target is what gets replaced (the link stays a link). A device or FIFO is written
    in place: replacing `/dev/null` with a regular file would break it for the whole machine.
    """
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        with _write_in_place(path, mode) as f:
            yield f
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have, or
    # the old file's, so replacing an output never changes who can read it.
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_current_umask())
    try:
        with os.fdopen(fd, mode, **_text_options(mode)) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.errno in NO_SPACE_ERRNOS:
            raise DiskFull(path, e) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _text_options(mode: str) -> dict:
    return {} if "b" in mode else {"encoding": "utf-8"}


@contextlib.contextmanager
def _write_in_place(path: Path, mode: str) -> Iterator[Any]:
    """Write straight into a character device or FIFO; refuse anything else that is not a file."""
    kind = path.stat().st_mode
    if not (stat.S_ISCHR(kind) or stat.S_ISFIFO(kind)):
        raise UserError(f"{path}: not a regular file, a character device or a FIFO; refusing to write there")
    try:
        with open(path, mode, **_text_options(mode)) as f:
            yield f
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            raise DiskFull(path, e) from None
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl_atomic(path, records: Iterable[dict], *, keep_empty: bool = True) -> int:
    """Write every record; with `keep_empty=False` no records means no file (an old one is removed),
    because `datasets` cannot load a 0-byte JSONL file."""
    if not keep_empty:
        records = list(records)
        if not records:
            if Path(path).is_file():
                Path(path).unlink()
            return 0
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


class AppendLog:
    """An append-only JSONL output that survives `kill -9`: one `os.write` per record.

    Opening it reads the records already there (`.records`) so a stage can resume; a torn
    last line, left by a crash mid-write, is cut off with a warning. A bad line anywhere
    else is real corruption and stops with an InputError rather than guessing. The output's
    lock (`output_lock`) is held while it is open, so two runs never append to one file.
    """

    def __init__(self, path, spec: FieldSpec | None = None, warn: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.records: list[dict] = []
        self.torn_bytes = 0
        self._lock = output_lock(self.path)
        self._lock.__enter__()
        try:
            if self.path.is_file():
                self.records, self.torn_bytes = recover_tail(self.path, spec, warn or _warn)
            # O_APPEND and one os.write per record: no buffer that a crash or a full disk can tear.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self._size = os.fstat(self._fd).st_size

    def write(self, record: dict) -> None:
        data = (dumps(record) + "\n").encode("utf-8")
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except BaseException as e:  # a full disk, or Ctrl-C between two parts of one short write
            # Cut the partial line so the file ends with a whole record; a rerun resumes from it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
                raise DiskFull(self.path, e) from None
            raise
        self._size += len(data)
        self.records.append(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            if self._size == 0 and self.path.is_file():
                # `datasets` cannot load a 0-byte JSONL file; no file says "nothing here" as well.
                self.path.unlink(missing_ok=True)
            self._fd = None
            self._lock.__exit__(None, None, None)

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def recover_tail(path, spec: FieldSpec | None, warn: Callable[[str], None]) -> tuple[list[dict], int]:
    """Read an append log; truncate a torn last line in place. Returns (records, bytes cut).

    A last line that parses but lacks its newline (a hand edit, another tool) is a whole
    record: it is kept and given its newline, not paid for again.
    """
    path = Path(path)
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1  # everything after the last newline may be a torn line
    tail = data[good_end:]
    if tail.strip() and _parses(tail):
        with open(path, "ab") as f:
            f.write(b"\n")
        data, good_end, tail = data + b"\n", len(data) + 1, b""
    torn = bool(tail.strip())
    body = data[:good_end]
    # A last line can end in a newline and still be cut mid-JSON when a writer died between
    # the two writes of a non-atomic print; check the last complete line parses.
    lines = body.split(b"\n")[:-1]
    if lines and lines[-1].strip() and not _parses(lines[-1]):
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


def _parses(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


@contextlib.contextmanager
def removed_if_unused(outputs: Iterable, beside: Iterable = ()) -> Iterator[None]:
    """Files this block creates are removed again if it stops with a UserError before writing a
    record: a 401 or a dead server on the first request leaves no empty outputs and no config.

    `outputs` are the record files; `beside` are files written before the first record (the
    resolved config). Files that existed before the block are never touched.
    """
    outputs, beside = [Path(p) for p in outputs], [Path(p) for p in beside]
    created = [p for p in (*outputs, *beside) if not os.path.lexists(p)]
    try:
        yield
    except UserError:
        if all(not p.exists() or (p.is_file() and p.stat().st_size == 0) for p in outputs):
            for path in created:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        raise
