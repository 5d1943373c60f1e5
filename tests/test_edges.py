"""Hardened edges, across every stage: bad input files, bad output paths, absurd flag values, Ctrl-C, a 401.

Each bad case must end with exit code 2 and one line on stderr naming the file and line (and
field) or the flag, with no traceback, and must leave the working folder exactly as it was: an
output that existed is byte-for-byte unchanged, one that did not still does not exist, and no
rejected file, resolved config, cache or run folder appears. The matrix runs `pipeline.cli.main`
in-process (the same code path as `python -m pipeline`, at a fraction of the cost); a few cases
per stage also run as real subprocesses, which catch a traceback or a heavy import (torch) that
happens before validation. Ctrl-C during the long stages must leave valid, resumable output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from pipeline import cli
from pipeline.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USER_ERROR
from tests.conftest import write_jsonl
from tests.test_generate import assert_clean_pool, diverse_server_answer

REPO = Path(__file__).resolve().parent.parent
# Nothing listens on the discard port: a stage that contacts the backend before its checks fail
# would hang in retries or fail with a connection error instead of the expected one line.
DEAD_URL = "http://127.0.0.1:9/v1"
OPENAI = ["--backend", "openai", "--base-url", DEAD_URL, "--model", "fake"]
# A cache folder that cannot be made (its parent is a device, not a folder): found before any request.
UNUSABLE_CACHE = "/dev/null/cache"
# Ten times the reader's 1 MiB per-record limit: the size of a broken export, not a record.
HUGE_LINE_BYTES = 10 * 1024 * 1024

ALPACA = {"instruction": "Name three colours of the rainbow.", "input": "", "output": "Red, orange and yellow."}
SEED = {"id": "seed_0", "name": "colours", "instruction": "Name three colours of the rainbow.",
        "instances": [{"input": "", "output": "Red, orange and yellow."}], "is_classification": False}
INSTRUCTION = {"id": "machine_0", "instruction": "Describe how a rainbow forms after the rain."}
QA_ROW = {"context": "The sky is blue.", "question": "What colour is the sky?", "answers": {"text": ["blue"], "answer_start": [11]}}


@dataclass
class Stage:
    """How to call one stage, which of its files gets the bad input, and what a bad record looks like."""

    name: str
    argv: Callable[[dict], list[str]]  # paths -> flags; paths: in, out, seeds, model
    good: dict  # a valid input record
    missing: tuple[dict, str]  # a record without a required field, and that field's name
    wrong_type: tuple[dict, str]  # a record with a field of the wrong type, and that field's name
    out_name: str  # the output's file (or folder) name
    out_flag: str
    existing_output: bytes  # what a previous run's output could hold
    flags: list[tuple[str, str]] = field(default_factory=list)  # (flag, absurd value)
    out_is_folder: bool = False
    # convert reads other people's datasets, where a broken row is normal: it skips that row
    # with one warning naming the file, row and field, and fails only when no row converts.
    skips_bad_rows: bool = False
    model_flags: Callable[[str], list[str]] | None = None  # a model path -> the flags that load it


STAGES = {s.name: s for s in [
    Stage("generate", lambda p: ["--seeds", p["in"], "--out", p["out"], "--num-instructions", "2",
                                 "--cache-dir", p["cache"], *OPENAI],
          SEED, ({k: v for k, v in SEED.items() if k != "instruction"}, "instruction"),
          ({**SEED, "instances": "Red"}, "instances"), "machine.jsonl", "--out",
          (json.dumps(INSTRUCTION) + "\n").encode(),
          [("--num-instructions", "-5"), ("--threshold", "7"), ("--concurrency", "0"), ("--timeout", "0"),
           ("--max-retries", "-1"), ("--temperature", "nan"), ("--batch-size", "0"), ("--max-tokens", "0"),
           ("--language", "ja"), ("--cache-dir", UNUSABLE_CACHE)], model_flags=lambda m: ["--backend", "local", "--model", m]),
    Stage("filter", lambda p: ["--in", p["in"], "--seeds", p["seeds"], "--out", p["out"]],
          INSTRUCTION, ({"id": "machine_1"}, "instruction"), ({"id": "machine_1", "instruction": 5}, "instruction"),
          "filtered.jsonl", "--out", (json.dumps({**INSTRUCTION, "max_rouge_l": 0.1}) + "\n").encode(),
          [("--threshold", "7"), ("--threshold", "nan"), ("--min-words", "-1"), ("--exact-scores-limit", "-1")]),
    Stage("respond", lambda p: ["--in", p["in"], "--seeds", p["seeds"], "--out", p["out"], "--cache-dir", p["cache"],
                                *OPENAI],
          INSTRUCTION, ({"id": "machine_1"}, "instruction"), ({"id": "machine_1", "instruction": ["x"]}, "instruction"),
          "alpaca.jsonl", "--out", (json.dumps(ALPACA) + "\n").encode(),
          [("--instances-per-instruction", "0"), ("--concurrency", "0"), ("--max-tokens", "0"), ("--top-p", "2"),
           ("--temperature", "nan"), ("--max-output-words", "-1"), ("--cache-dir", UNUSABLE_CACHE)], model_flags=lambda m: ["--backend", "local", "--model", m]),
    Stage("finetune", lambda p: ["--data", p["in"], "--output-dir", p["out"], "--model", p["model"], "--max-steps", "1"],
          ALPACA, ({"instruction": "Say hi."}, "output"), ({**ALPACA, "output": 5}, "output"), "run", "--output-dir",
          b"", [("--epochs", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--max-length", "0"), ("--batch-size", "0"),
                ("--grad-accum", "0"), ("--val-fraction", "1.5"), ("--lora", "-2"), ("--warmup-ratio", "-0.5")],
          out_is_folder=True, model_flags=lambda m: ["--model", m]),
    Stage("eval", lambda p: ["--model", p["model"], "--data", p["in"], "--out", p["out"]],
          ALPACA, ({"instruction": "Say hi."}, "output"), ({**ALPACA, "input": 3}, "input"), "eval.json", "--out",
          b'{"metrics": {}}\n', [("--limit", "-3"), ("--batch-size", "0"), ("--max-length", "0"),
                                 ("--max-new-tokens", "0")], model_flags=lambda m: ["--model", m]),
    Stage("inspect", lambda p: [p["in"], "--html", p["out"], "--seeds", p["seeds"]],
          ALPACA, ({"input": "", "output": "x"}, "instruction"), ({**ALPACA, "instruction": 5}, "instruction"),
          "report.html", "--html", b"<html>an earlier report</html>\n", [("--samples", "-1"), ("--table-rows", "-1")]),
    Stage("convert", lambda p: ["--kind", "qa", "--in", p["in"], "--out", p["out"]],
          QA_ROW, ({k: v for k, v in QA_ROW.items() if k != "question"}, "question"),
          ({**QA_ROW, "question": ["a"]}, "question"), "converted.jsonl", "--out",
          (json.dumps(ALPACA) + "\n").encode(), [("--labels", ","), ("--in", "")], skips_bad_rows=True),
    Stage("judge", lambda p: ["--in", p["in"], "--out", p["out"], "--cache-dir", p["cache"], *OPENAI],
          ALPACA, ({"instruction": "Say hi."}, "output"), ({**ALPACA, "output": 5}, "output"), "judged.jsonl", "--out",
          (json.dumps({**ALPACA, "judge": {"score": 4, "record_key": "0123456789abcdef#0"}}) + "\n").encode(),
          [("--min-score", "9"), ("--max-tokens", "0"), ("--temperature", "nan"), ("--limit", "0"),
           ("--cache-dir", UNUSABLE_CACHE)], model_flags=lambda m: ["--backend", "local", "--model", m]),
    Stage("mix", lambda p: ["--in", p["in"], "--out", p["out"]],
          ALPACA, ({"input": "", "output": "x"}, "instruction"), ({**ALPACA, "instruction": 5}, "instruction"),
          "train.jsonl", "--out", (json.dumps(ALPACA) + "\n").encode(),
          [("--weights", "-1"), ("--weights", "nan"), ("--threshold", "7")]),
]}

# Bad input files: name -> how to write it, and what the one line must say beyond the path.
# The bad record sits on line 2 after a good one, so the message must count lines right.
INPUT_CASES = ["empty", "not_json", "missing_field", "wrong_type", "invalid_utf8", "huge_line", "no_such_file"]
OUTPUT_CASES = ["out_folder_missing", "out_under_a_file"]
MODEL_CASE = "no_such_model"


def write_input(stage: Stage, case: str, path: Path) -> tuple[str | None, str | None]:
    """Write the bad input for `case`; return (line, field) the message must name (None: not applicable)."""
    good = json.dumps(stage.good).encode() + b"\n"
    if case == "empty":
        path.write_bytes(b"")
        return None, None
    if case == "no_such_file":
        return None, None
    if case == "not_json":
        path.write_bytes(good + b"this is not JSON\n")
        return "2", None
    if case == "missing_field":
        path.write_bytes(good + json.dumps(stage.missing[0]).encode() + b"\n")
        return "2", stage.missing[1]
    if case == "wrong_type":
        path.write_bytes(good + json.dumps(stage.wrong_type[0]).encode() + b"\n")
        return "2", stage.wrong_type[1]
    if case == "invalid_utf8":
        path.write_bytes(good + b'{"instruction": "caf\xe9 \xff"}\n')
        return "2", None
    if case == "huge_line":
        path.write_bytes(good + b'{"instruction": "' + b"a" * HUGE_LINE_BYTES + b'"}\n')
        return "2", None
    raise AssertionError(case)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under `root` with its bytes: any write, new file or new folder changes it."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def workdir(tmp_path: Path, stage: Stage, existing: bool, model_dir: str) -> dict:
    """A folder holding a good seed file and input, and (if `existing`) a previous run's output."""
    work = tmp_path / "work"
    work.mkdir()
    write_jsonl(work / "seeds.jsonl", [SEED, {**SEED, "id": "seed_1", "instruction": "Write a haiku about the sea."}])
    in_path = work / "in.jsonl"
    write_jsonl(in_path, [stage.good])
    out = work / stage.out_name
    if existing:
        if stage.out_is_folder:
            out.mkdir()
            (out / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.5}\n')
        else:
            out.write_bytes(stage.existing_output)
    return {"work": work, "in": str(in_path), "out": str(out), "seeds": str(work / "seeds.jsonl"),
            "cache": str(work / "cache"), "model": model_dir}


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not named in: {lines[0]}"


def cases():
    for stage in STAGES:
        for case in INPUT_CASES:
            for existing in (False, True):
                yield pytest.param(stage, case, existing, id=f"{stage}-{case}-{'existing' if existing else 'fresh'}")
        for case in OUTPUT_CASES:
            yield pytest.param(stage, case, False, id=f"{stage}-{case}")
        if STAGES[stage].model_flags:
            yield pytest.param(stage, MODEL_CASE, True, id=f"{stage}-{MODEL_CASE}")
        for flag, value in STAGES[stage].flags:
            for existing in (False, True):
                yield pytest.param(stage, f"flag:{flag}={value}", existing,
                                   id=f"{stage}-{flag}={value}-{'existing' if existing else 'fresh'}")


def prepare(stage: Stage, case: str, existing: bool, tmp_path: Path, model_dir: str) -> tuple[list[str], list[str], Path]:
    """The argv for one cell of the matrix, the words its error line must contain, and the folder to watch."""
    paths = workdir(tmp_path, stage, existing, model_dir)
    work = paths["work"]
    needles: list[str] = []
    if case in INPUT_CASES:
        bad = work / "bad.jsonl"
        line, field_name = write_input(stage, case, bad)
        paths["in"] = str(bad)
        needles = [f"{bad}:{line}" if line else str(bad)] + ([field_name] if field_name else [])
    elif case == MODEL_CASE:
        return [stage.name, *stage.argv(paths), *stage.model_flags(str(work / "no-such-model"))], ["--model"], work
    elif case == "out_folder_missing":
        paths["out"] = str(work / "no-such-folder" / stage.out_name)
        if stage.out_is_folder:  # a run folder's parents are made (runs/ on a fresh clone); nest under a file instead
            (work / "a-file").write_text("not a folder\n")
            paths["out"] = str(work / "a-file" / "deeper" / stage.out_name)
        needles = [stage.out_flag]
    elif case == "out_under_a_file":
        (work / "a-file").write_text("not a folder\n")
        paths["out"] = str(work / "a-file" / stage.out_name)
        needles = [stage.out_flag]
    else:
        flag, value = case.removeprefix("flag:").split("=", 1)
        argv = [*stage.argv(paths), flag, value]
        return [stage.name, *argv], [flag], work
    return [stage.name, *stage.argv(paths)], needles, work


@pytest.mark.parametrize("stage_name, case, existing", list(cases()))
def test_bad_input_ends_with_one_line_and_leaves_no_trace(stage_name, case, existing, tmp_path, model_dir,
                                                          capsys, monkeypatch):
    stage = STAGES[stage_name]
    argv, needles, work = prepare(stage, case, existing, tmp_path, model_dir)
    monkeypatch.chdir(work)  # a stray default path (data/, runs/) would land here and be seen
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-edges-test")
    before = snapshot(work)
    code, stderr = run_in_process(argv, capsys)
    if stage.skips_bad_rows and case in ("missing_field", "wrong_type"):
        assert code == 0, stderr
        assert_one_line(stderr, "bad.jsonl row 2", needles[-1])
        assert len((work / stage.out_name).read_text().splitlines()) == 1, "the good row, and only it"
        return
    assert code == EXIT_USER_ERROR, stderr
    assert_one_line(stderr, *needles)
    assert snapshot(work) == before


# An output that is one of the inputs: by the same name, by another path, through a hard link, or
# a file written beside the output (the rejected file, the report). Each must be refused with one
# line before anything is written: the input keeps every byte.
ALIAS_CASES = [(stage, "in") for stage in STAGES if not STAGES[stage].out_is_folder] + [
    (stage, "in-hardlink") for stage in ("generate", "mix", "convert")] + [
    (stage, "seeds") for stage in ("generate", "filter", "respond", "inspect")] + [
    ("filter", "report=seeds"), ("filter", "rejected=in"), ("respond", "rejected=seeds"), ("finetune", "data-in-run")]


@pytest.mark.parametrize("stage_name, alias", ALIAS_CASES, ids=[f"{s}-out={a}" for s, a in ALIAS_CASES])
def test_an_output_that_is_an_input_is_refused_before_anything_is_written(stage_name, alias, tmp_path, model_dir,
                                                                          capsys, monkeypatch):
    stage = STAGES[stage_name]
    paths = workdir(tmp_path, stage, False, model_dir)
    work = paths["work"]
    if stage_name == "generate":
        paths["in"] = paths["seeds"]  # generate's input is its seed file
    flag, extra = stage.out_flag, []
    if alias == "in":
        paths["out"] = paths["in"]
    elif alias == "in-hardlink":
        os.link(paths["in"], work / "linked.jsonl")
        paths["out"] = str(work / "linked.jsonl")
    elif alias == "seeds":
        paths["out"] = paths["seeds"]
    elif alias == "report=seeds":
        flag, extra = "--report", ["--report", paths["seeds"]]
    elif alias == "rejected=in":  # --out x.jsonl writes x.rejected.jsonl beside it, which is the input here
        os.rename(paths["in"], work / "x.rejected.jsonl")
        paths["in"], paths["out"] = str(work / "x.rejected.jsonl"), str(work / "x.jsonl")
    elif alias == "rejected=seeds":
        os.rename(paths["seeds"], work / "x.rejected.jsonl")
        paths["seeds"], paths["out"] = str(work / "x.rejected.jsonl"), str(work / "x.jsonl")
    elif alias == "data-in-run":  # a run folder's val.jsonl given back as the training data
        (work / "run").mkdir()
        os.rename(paths["in"], work / "run" / "val.jsonl")
        paths["in"] = str(work / "run" / "val.jsonl")
    monkeypatch.chdir(work)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-edges-test")
    before = snapshot(work)
    code, stderr = run_in_process([stage.name, *stage.argv(paths), *extra], capsys)
    assert code == EXIT_USER_ERROR, stderr
    assert_one_line(stderr, flag, "is the input", "it would be overwritten")
    assert snapshot(work) == before


# A few cells per stage as real processes: the exit code and stderr of `python -m pipeline`,
# and no torch import before validation (that would make every typo cost seconds).
SUBPROCESS_CASES = [(stage, ("not_json", "out_under_a_file")[i % 2]) for i, stage in enumerate(STAGES)] + [
    (stage, f"flag:{s.flags[0][0]}={s.flags[0][1]}") for stage, s in STAGES.items() if stage in ("finetune", "eval")]


def cli_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "sk-edges-test", "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_BASE_URL", None)
    return env


@pytest.mark.parametrize("stage_name, case", SUBPROCESS_CASES, ids=[f"{s}-{c}" for s, c in SUBPROCESS_CASES])
def test_real_cli_exits_2_with_one_line_before_importing_torch(stage_name, case, tmp_path, model_dir):
    stage = STAGES[stage_name]
    argv, needles, work = prepare(stage, case, True, tmp_path, model_dir)
    before = snapshot(work)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", *argv], cwd=work, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    imports = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert_one_line(stderr, *needles)
    assert snapshot(work) == before
    heavy = [line for line in imports if line.rstrip().endswith(("| torch", "| transformers", "| datasets"))]
    assert not heavy, f"{stage_name} imported {heavy} before rejecting its input"


# ---------------------------------------------------------------- a server that refuses or is dead

# (fault, what the one line must say): a 401 stops at the first answer; a closed port or a server
# that only answers 500 stops once the first requests all failed after their retries (generate:
# 2 in flight), or when its only request did (respond, one instruction) (issue 13, item 8).
SERVER_FAILURES = [
    ("401", "authentication failed at {url}: check OPENAI_API_KEY"),
    ("dead", "cannot connect to {url}: connection refused"),
    ("500", "HTTP 500 from {url}: The server had an error while processing your request."),
]


@pytest.mark.parametrize("fault, message", SERVER_FAILURES, ids=[f for f, _ in SERVER_FAILURES])
def test_a_refusing_or_dead_server_ends_generate_and_respond_with_one_line_and_no_files(
        fault, message, tmp_path, fake_openai, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key")
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [SEED])
    instructions = write_jsonl(tmp_path / "in.jsonl", [INSTRUCTION])
    url = DEAD_URL if fault == "dead" else fake_openai.base_url
    backend = ["--backend", "openai", "--base-url", url, "--model", "fake", "--concurrency", "2", "--max-retries", "1",
               "--cache-dir", str(tmp_path / "cache")]
    for stage, argv in [("generate", ["--seeds", str(seeds), "--out", str(tmp_path / "machine.jsonl")]),
                        ("respond", ["--in", str(instructions), "--seeds", str(seeds),
                                     "--out", str(tmp_path / "alpaca.jsonl")])]:
        fake_openai.faults = [] if fault == "dead" else [fault] * 20
        fake_openai.requests = 0
        start = time.monotonic()
        code, stderr = run_in_process([stage, *argv, *backend], capsys)
        assert code == EXIT_USER_ERROR, stderr
        assert time.monotonic() - start < 60
        lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
        assert "Traceback" not in stderr
        assert lines[-1].startswith("error: ") and message.format(url=url) in lines[-1], stderr
        assert sum(line.startswith("error:") for line in lines) == 1, stderr
        if fault == "401":
            assert fake_openai.requests <= 2, "a 401 is not retried (2 in flight)"
        # Nothing was written: no empty outputs, no resolved config, no cache entries (item 12).
        left = {p.name for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
        assert left == {"seeds.jsonl", "in.jsonl"}, left


# ---------------------------------------------------------------- Ctrl-C during the long stages


def read_jsonl_strict(path: Path) -> list[dict]:
    """Every line parses and ends with a newline: nothing torn."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path}: torn last line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60,
                   while_running: Callable[[], None] | None = None, signals=(signal.SIGINT,)) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.communicate()[1][-2000:]
    if while_running is not None:
        while_running()
        assert proc.poll() is None, "the run ended before it could be interrupted"
    for signum in signals:
        proc.send_signal(signum)
    return proc.communicate(timeout=60)


def assert_last_line(stderr: str, *needles: str) -> None:
    """No traceback, one error line, and it is the last line (a progress bar may sit above it)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in stderr and sum(line.startswith("error:") for line in lines) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], stderr[-3000:]


def assert_second_run_refused(argv: list[str], cwd: Path, holder: subprocess.Popen, out: Path) -> None:
    """A second run on the same output, while the first writes it: refused at once, naming the first."""
    started = time.monotonic()
    second = popen(argv, cwd)
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == EXIT_USER_ERROR, stdout[-2000:] + stderr[-3000:]
    assert_one_line(stderr, str(out), f"another run is writing it (pid {holder.pid}: python -m pipeline {argv[0]} ")
    assert time.monotonic() - started < 30, "refused at once, not after it did its work"


def assert_interrupted(proc: subprocess.Popen, stderr: str, code: int = EXIT_INTERRUPTED, word: str = "interrupted") -> None:
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # tqdm's bar may sit above it (it redraws with \r); the last line is ours, and only one says so.
    last = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith(f"{word}:"), stderr[-3000:]
    assert stderr.count(word) == 1


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def popen(argv: list[str], cwd: Path, max_file_bytes: int | None = None) -> subprocess.Popen:
    """`python -m pipeline ARGV`; with `max_file_bytes`, no file it writes may grow past that size
    (`ulimit -f`: a write past it fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    def limit_file_size():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_file_size if max_file_bytes else None)


@pytest.mark.slow
def test_ctrl_c_during_generate_leaves_valid_resumable_output(tmp_path, fake_openai):
    fake_openai.answer = diverse_server_answer
    fake_openai.latency = 0.05
    out = tmp_path / "machine.jsonl"
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [SEED, {**SEED, "id": "seed_1", "instruction": "Write a haiku about the sea."}])
    argv = ["generate", "--seeds", str(seeds), "--out", str(out), "--num-instructions", "30", "--concurrency", "2",
            "--backend", "openai", "--base-url", fake_openai.base_url, "--model", "fake",
            "--cache-dir", str(tmp_path / "cache")]
    proc = popen(argv, tmp_path)


    def second_run_while_the_first_writes():
        fake_openai.latency = 5.0  # so the first run is still writing while the second starts up
        assert_second_run_refused(argv, tmp_path, proc, out)
        fake_openai.latency = 0.05

    _, stderr = interrupt_when(proc, lambda: line_count(out) >= 5, while_running=second_run_while_the_first_writes)
    assert_interrupted(proc, stderr)
    before = read_jsonl_strict(out)
    assert 5 <= len(before) < 30
    assert not (tmp_path / "machine.lock").exists(), "the lock file goes with the run that held it"
    fake_openai.latency = 0
    # The disk fills up part way: one line, exit 2, every output still whole, and the rerun resumes.
    full = popen(argv, tmp_path, max_file_bytes=out.stat().st_size + 100)  # less than one more record
    _, stderr = full.communicate(timeout=120)
    assert full.returncode == EXIT_USER_ERROR, stderr[-3000:]
    assert_last_line(stderr, "error: ", "cannot write: File too large; the outputs written so far are valid")
    assert read_jsonl_strict(out)[:len(before)] == before
    rerun = popen(argv, tmp_path)
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr[-3000:]
    records = read_jsonl_strict(out)
    assert_clean_pool(records, 30)
    assert records[:len(before)] == before


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, EXIT_INTERRUPTED, "interrupted"),
                                                (signal.SIGTERM, EXIT_TERMINATED, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_respond_leaves_valid_resumable_output(tmp_path, fake_openai, signum, code, word):
    """Ctrl-C, and SIGTERM (what `kill`, systemd, Docker and Slurm send) stopped the same clean way."""
    fake_openai.answer = lambda body: "No" if "classification task" in json.dumps(body) else (
        f"Input: case {body.get('seed')}\nOutput: the answer for {json.dumps(body)[-40:]}")
    fake_openai.latency = 0.03
    tasks = [{"id": f"k{i}", "instruction": f"Describe thing number {i} in one sentence."} for i in range(30)]
    in_path = write_jsonl(tmp_path / "in.jsonl", tasks)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [SEED])
    out = tmp_path / "alpaca.jsonl"
    argv = ["respond", "--in", str(in_path), "--seeds", str(seeds), "--out", str(out), "--concurrency", "2",
            "--backend", "openai", "--base-url", fake_openai.base_url, "--model", "fake", "--no-cache"]
    # Past the 30 classification questions: one request the server refuses (a rejected record,
    # never sent again) and one 500 (retried).
    fake_openai.faults = [None] * 32 + ["422", "500"]
    proc = popen(argv, tmp_path)
    _, stderr = interrupt_when(proc, lambda: line_count(out) >= 5, signals=(signum,))
    assert_interrupted(proc, stderr, code, word)
    rejected = tmp_path / "alpaca.rejected.jsonl"
    before = read_jsonl_strict(out)
    assert 5 <= len(before) < 30
    if rejected.exists():
        read_jsonl_strict(rejected)
    fake_openai.latency = 0
    rerun = popen(argv, tmp_path)
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr[-3000:]
    ids = [r["id"] for r in read_jsonl_strict(out)]
    ids += [r["id"] for r in read_jsonl_strict(rejected)] if rejected.exists() else []
    assert sorted(ids) == sorted(f"k{i}-0" for i in range(30)), "each instance once: none lost, none twice"
    assert [r["reason"] for r in read_jsonl_strict(rejected)].count("request_rejected") == 1


@pytest.mark.slow
def test_ctrl_c_during_finetune_leaves_valid_resumable_output(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i}"} for i in range(16)])
    run_dir = tmp_path / "run"
    steps = 30
    argv = ["finetune", "--data", str(data), "--output-dir", str(run_dir), "--model", model_dir, "--max-steps",
            str(steps), "--save-every", "5", "--eval-every", "0", "--batch-size", "2", "--max-length", "64",
            "--lr", "1e-3", "--device", "cpu"]
    metrics = run_dir / "metrics.jsonl"
    proc = popen(argv, tmp_path)
    _, stderr = interrupt_when(proc, lambda: line_count(metrics) >= 8, timeout=120)
    assert_interrupted(proc, stderr)
    before = read_jsonl_strict(metrics)
    assert 8 <= len(before) < steps
    rerun = popen([*argv, "--resume"], tmp_path)
    _, stderr = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, stderr[-3000:]
    steps_seen = [r["step"] for r in read_jsonl_strict(metrics)]
    assert steps_seen == list(range(1, steps + 1)), "metrics resume where the checkpoint was: none lost, none twice"


# ---------------------------------------------------------------- no 0-byte files that `datasets` cannot load


def test_a_run_that_rejects_nothing_leaves_no_empty_rejected_file(tmp_path, capsys):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [SEED])
    machine = write_jsonl(tmp_path / "machine.jsonl", [INSTRUCTION, {"id": "machine_1", "instruction": "次の文章を英語に翻訳してください。"}])
    rejected = tmp_path / "kept.rejected.jsonl"
    rejected.write_text(json.dumps({**INSTRUCTION, "reason": "near_duplicate"}) + "\n")  # from an earlier run
    code, stderr = run_in_process(["filter", "--in", str(machine), "--seeds", str(seeds), "--out", str(tmp_path / "kept.jsonl")],
                                  capsys)
    assert code == 0, stderr
    assert len((tmp_path / "kept.jsonl").read_text("utf-8").splitlines()) == 2
    assert not rejected.exists(), "no rejects: no file (an empty one cannot be loaded), and no stale one"


# ---------------------------------------------------------------- outputs that are links or devices


def test_an_output_through_a_symlink_writes_its_target_and_devices_are_never_replaced(tmp_path, capsys):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [SEED])
    machine = write_jsonl(tmp_path / "machine.jsonl", [INSTRUCTION, {"id": "machine_1", "instruction": "次の文章を英語に翻訳してください。"}])
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "kept.jsonl"
    target.write_text("old\n")
    link = tmp_path / "kept.jsonl"
    link.symlink_to(target)
    argv = ["filter", "--in", str(machine), "--seeds", str(seeds)]
    code, stderr = run_in_process([*argv, "--out", str(link)], capsys)
    assert code == 0, stderr
    assert link.is_symlink() and len(target.read_text("utf-8").splitlines()) == 2
    code, stderr = run_in_process([*argv, "--out", "/dev/null", "--report", "/dev/null"], capsys)
    assert code == 0, stderr
    assert os.path.exists("/dev/null") and not Path("/dev/null").is_file(), "/dev/null is still a device"
    assert not list(Path("/dev").glob("null.*")), "nothing written beside a device"
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA, {"instruction": "日本の首都は？", "input": "", "output": "東京です。"}])
    code, stderr = run_in_process(["mix", "--in", str(alpaca), "--out", "/dev/full"], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_line(stderr, "/dev/full: cannot write: No space left on device")
    assert not Path("/dev/full").is_file()
