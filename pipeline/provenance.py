"""What made an output: library versions, the project's git commit, and the command line, never a secret.

`config.write_resolved_config` adds `provenance()` to every `*.config.json`, and the model and
dataset cards (`pipeline.cards`) print it, so a run can be reproduced from the file beside it.

- The git commit is read with `git rev-parse HEAD` in the folder this package lives in; when
  there is no git (an installed wheel, a container without it) the field is null: never a failure.
- The command line is the one `cli.main` was given (`set_command_line`), else `sys.argv`. A value
  after a secret-named flag (`--api-key X`, `--token=X`) is replaced, and every URL goes through
  `pipeline.urls.redact_urls`, so `--base-url http://user:key@host` keeps its host and drops the key.
"""

from __future__ import annotations

import functools
import importlib.metadata
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.urls import REDACTED, redact_urls

# The libraries whose versions decide what a run computes (tokenization, kernels, loaders), by
# distribution name; one that is not installed is left out.
LIBRARIES = ("self-instruct-pipeline", "torch", "transformers", "accelerate", "peft", "datasets", "huggingface_hub",
             "openai", "safetensors", "tokenizers", "rapidfuzz", "sacrebleu", "numpy")
GIT_TIMEOUT_S = 5  # a git that hangs (a network filesystem, a lock) must not hold the run up

_command_line: list[str] | None = None


def set_command_line(argv: list[str]) -> None:
    """The stage's own arguments, as `cli.main` received them (`sys.argv` when a test calls `main([...])` is pytest's)."""
    global _command_line
    _command_line = list(argv)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the repository holding this package, with `+dirty` when tracked files differ from it; None without git."""
    folder = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=folder, capture_output=True,
                               timeout=GIT_TIMEOUT_S).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def is_secret_flag(arg: str) -> bool:
    """A flag named as `config.to_dict` names a field it never writes (`--api-key`; not `--max-tokens`)."""
    from pipeline.config import SECRET_WORDS  # here: config imports this module

    name = arg.split("=", 1)[0].lstrip("-").lower().replace("-", "_")
    return arg.startswith("--") and any(word in name for word in SECRET_WORDS)


def redact_command(argv: list[str]) -> list[str]:
    """The arguments with every secret flag's value replaced and credentials cut from every URL."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("--"):
            out.append(REDACTED)
        elif is_secret_flag(arg) and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(redact_urls(arg))
        hide_next = is_secret_flag(arg) and "=" not in arg
    return out


def command_line() -> str:
    if _command_line is not None:
        return "python -m pipeline " + shlex.join(redact_command(_command_line))
    return shlex.join(redact_command([Path(sys.argv[0]).name, *sys.argv[1:]]))


def provenance() -> dict:
    return {"command": command_line(), "git_commit": git_commit(), "python": sys.version.split()[0],
            "libraries": library_versions()}
