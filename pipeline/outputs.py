"""Which files a stage touches, and who may write them: shared by every stage, below them all.

- `path_beside`, `rejected_path_for`, `config_path_for`, `lock_path_for`: the files that belong to
  an output (`data/x.jsonl` -> `data/x.rejected.jsonl`, `x.config.json`, `x.lock`).
- `check_output_path` / `check_output_folder`: fail early, naming the flag, when an output cannot
  be written, before any work is done.
- `claim_outputs` (inside a `run` decorated with `locked_outputs`): every stage calls it once its
  paths are known. It refuses an output that is one of the inputs (`check_outputs_apart`: by
  identity, so a hard link or a symlink counts too, with the config and lock files beside each
  output), then holds each output's lock until `run` ends.
- `output_lock`: an OS lock (`flock`) on `<output>.lock`, so a second run on the same output
  refuses at once, naming the first; the kernel drops it when the holder dies (even by kill -9),
  so no run ever needs a manual cleanup. `jsonl.AppendLog` takes it too.

A device or FIFO output (`--out /dev/null`) is written in place (`jsonl.atomic_write`), is never
locked or compared, and the files beside it are thrown away with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import UserError


def is_special(path) -> bool:
    """True for an existing output that is not a regular file (a device, a FIFO): written in place, never locked."""
    path = Path(path)
    return path.exists() and not path.is_dir() and not path.is_file()


def path_beside(output, suffix: str) -> Path:
    """A file that belongs to `output`: `data/x.jsonl` + `rejected.jsonl` -> `data/x.rejected.jsonl`.

    The files beside a device or FIFO output (`--out /dev/null`) are thrown away with it: making
    `/dev/null.config.json` would litter /dev.
    """
    output = Path(output)
    if is_special(output):
        return Path(os.devnull)
    return output.with_name(output.name.rsplit(".", 1)[0] + "." + suffix)


def lock_path_for(output) -> Path:
    """`data/x.jsonl` -> `data/x.lock`; a run folder `runs/sft` -> `runs/sft.lock` (the same before and after it exists).

    Beside the file really written: two runs naming one file through different symlinks share one lock.
    """
    return path_beside(os.path.realpath(output), "lock")


def config_path_for(output) -> Path:
    """`data/x.jsonl` -> `data/x.config.json`; a folder `runs/sft` -> `runs/sft/config.json`."""
    output = Path(output)
    if output.is_dir():
        return output / "config.json"
    return path_beside(output, "config.json")


def check_outputs_apart(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Refuse, before anything is written, an output that is one of the inputs.

    `inputs` and `outputs` map a flag to a path, a list of paths, or None. Each output counts with
    the config and lock files written beside it. Files that exist are compared by identity
    (`samefile`: hard links and symlinks too), others by their resolved path. A device or FIFO
    output is never compared: writing `/dev/null` destroys nothing.
    """
    given = [(flag, Path(p)) for flag, paths in inputs.items() for p in _as_list(paths)]
    for out_flag, paths in outputs.items():
        for out in _as_list(paths):
            out = Path(out)
            for written in (out, config_path_for(out), lock_path_for(out)):
                for in_flag, source in given:
                    if not is_special(written) and _same_file(written, source):
                        what = "" if written == out else f"writes {written}, which "
                        raise UserError(f"{out_flag} {out}: {what}is the input {in_flag} {source}; "
                                        f"it would be overwritten: choose another {out_flag}")


def _as_list(paths) -> list:
    if paths is None or paths == "":
        return []
    return [p for p in paths if p] if isinstance(paths, (list, tuple)) else [paths]


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


# One ExitStack per stage run in progress (see `locked_outputs`): the locks `claim_outputs` takes.
_RUN_SCOPES: list[contextlib.ExitStack] = []


def locked_outputs(run: Callable) -> Callable:
    """Decorate a stage's `run`: the output locks it claims are released when it returns or raises."""
    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as scope:
            _RUN_SCOPES.append(scope)
            try:
                return run(*args, **kwargs)
            finally:
                _RUN_SCOPES.remove(scope)
    return wrapper


def claim_outputs(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """What every stage calls once its paths are known and before it writes anything.

    Refuses an output that is an input (`check_outputs_apart`), then locks each output
    (`output_lock`) until the decorated `run` ends, so a second run on it refuses at once.
    """
    if not _RUN_SCOPES:
        raise RuntimeError("claim_outputs: call it inside a run decorated with @locked_outputs")
    check_outputs_apart(inputs, outputs)
    for flag, paths in outputs.items():
        for path in _as_list(paths):
            _RUN_SCOPES[-1].enter_context(output_lock(path, flag))


# Locks this process holds: lock path -> [open file, how many callers hold it]. Re-entrant, because
# flock locks conflict even within one process when taken through two opens of the same file.
_HELD_LOCKS: dict[str, list] = {}


@contextlib.contextmanager
def output_lock(output, flag: str = "--out") -> Iterator[None]:
    """Hold `<output>.lock` while writing `output`; a second run on the same output refuses at once.

    The lock is `flock`, so the kernel releases it when the holder exits, even by kill -9: a
    stale lock file is just reused. The holder's pid and command are written into it, so the
    refusal can say who holds it. The file is removed on release (only while still locked, and a
    taker checks it locked the file that is still there, so two runs can never both hold one).
    """
    if is_special(output):
        yield
        return
    path = lock_path_for(output)
    key = os.path.realpath(path)
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    f = _take_lock(path, output, flag)
    _HELD_LOCKS[key] = [f, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        f.close()


def _take_lock(path: Path, output, flag: str):
    # An output folder's lock sits beside the folder (`runs/sft.lock`), and on a fresh clone the
    # folder above it (`runs/`) does not exist yet: the stage's checks have already said it may be made.
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{flag} {output}: another run is writing it ({holder}, lock {path}); "
                            "wait for it to end, or choose another " + flag) from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the previous holder removed this file as we opened it: take the new one
    f.truncate(0)
    f.write(f"pid {os.getpid()}: {_command()}")
    f.flush()
    return f


def rejected_path_for(out) -> Path:
    """Where a stage puts the records it turned down: `data/x.jsonl` -> `data/x.rejected.jsonl`."""
    return path_beside(out, "rejected.jsonl")


def check_output_path(path, flag: str) -> Path:
    """Fail early, naming the flag, if `path` cannot be written: before any work is done."""
    path = Path(path)
    if is_special(path):  # a device or FIFO is written in place: only it must be writable
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path}: cannot write there (permission denied)")
        return path
    parent = Path(os.path.realpath(path)).parent  # a symlink's target is what gets written
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


# The holder's command in a refusal is cut here, so the refusal stays one readable line.
MAX_COMMAND_CHARS = 200


def _command() -> str:
    """This process's command as the person typed it: `python -m pipeline generate --out ...`."""
    program = "python -m pipeline" if sys.argv[0].endswith("__main__.py") else os.path.basename(sys.argv[0])
    return " ".join([program, *sys.argv[1:]])[:MAX_COMMAND_CHARS]
