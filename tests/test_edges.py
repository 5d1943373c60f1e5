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
from pipeline.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR
from tests.conftest import write_jsonl
from tests.test_generate import assert_clean_pool, diverse_server_answer

REPO = Path(__file__).resolve().parent.parent
# Nothing listens on the discard port: a stage that contacts the backend before its checks fail
# would hang in retries or fail with a connection error instead of the expected one line.
DEAD_URL = "http://127.0.0.1:9/v1"
OPENAI = ["--backend", "openai", "--base-url", DEAD_URL, "--model", "fake"]
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
           ("--language", "ja")], model_flags=lambda m: ["--backend", "local", "--model", m]),
    Stage("filter", lambda p: ["--in", p["in"], "--seeds", p["seeds"], "--out", p["out"]],
          INSTRUCTION, ({"id": "machine_1"}, "instruction"), ({"id": "machine_1", "instruction": 5}, "instruction"),
          "filtered.jsonl", "--out", (json.dumps({**INSTRUCTION, "max_rouge_l": 0.1}) + "\n").encode(),
          [("--threshold", "7"), ("--threshold", "nan"), ("--min-words", "-1"), ("--exact-scores-limit", "-1")]),
    Stage("respond", lambda p: ["--in", p["in"], "--seeds", p["seeds"], "--out", p["out"], "--cache-dir", p["cache"],
                                *OPENAI],
          INSTRUCTION, ({"id": "machine_1"}, "instruction"), ({"id": "machine_1", "instruction": ["x"]}, "instruction"),
          "alpaca.jsonl", "--out", (json.dumps(ALPACA) + "\n").encode(),
          [("--instances-per-instruction", "0"), ("--concurrency", "0"), ("--max-tokens", "0"), ("--top-p", "2"),
           ("--temperature", "nan"), ("--max-output-words", "-1")], model_flags=lambda m: ["--backend", "local", "--model", m]),
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


# ---------------------------------------------------------------- a 401 from the server


def test_a_401_ends_generate_and_respond_with_one_clear_line(tmp_path, fake_openai, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key")
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [SEED])
    instructions = write_jsonl(tmp_path / "in.jsonl", [INSTRUCTION])
    backend = ["--backend", "openai", "--base-url", fake_openai.base_url, "--model", "fake", "--no-cache", "--concurrency", "2",
               "--max-retries", "1"]
    for stage, argv in [("generate", ["--seeds", str(seeds), "--out", str(tmp_path / "machine.jsonl")]),
                        ("respond", ["--in", str(instructions), "--seeds", str(seeds),
                                     "--out", str(tmp_path / "alpaca.jsonl")])]:
        fake_openai.faults = ["401"] * 20
        code, stderr = run_in_process([stage, *argv, *backend], capsys)
        assert code in (1, 2), stderr
        lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
        assert "Traceback" not in stderr
        assert lines[-1].startswith("error: authentication failed") and "OPENAI_API_KEY" in lines[-1], stderr
        assert sum(line.startswith("error:") for line in lines) == 1, stderr
        assert fake_openai.requests <= 2, "a 401 is not retried (2 in flight)"
        fake_openai.requests = 0


# ---------------------------------------------------------------- Ctrl-C during the long stages


def read_jsonl_strict(path: Path) -> list[dict]:
    """Every line parses and ends with a newline: nothing torn."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path}: torn last line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)


def assert_interrupted(proc: subprocess.Popen, stderr: str) -> None:
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # tqdm's bar may sit above it (it redraws with \r); the last line is ours, and only one says so.
    last = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("interrupted:"), stderr[-3000:]
    assert stderr.count("interrupted") == 1


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def popen(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
    _, stderr = interrupt_when(proc, lambda: line_count(out) >= 5)
    assert_interrupted(proc, stderr)
    before = read_jsonl_strict(out)
    assert 5 <= len(before) < 30
    fake_openai.latency = 0
    rerun = popen(argv, tmp_path)
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr[-3000:]
    records = read_jsonl_strict(out)
    assert_clean_pool(records, 30)
    assert records[:len(before)] == before


@pytest.mark.slow
def test_ctrl_c_during_respond_leaves_valid_resumable_output(tmp_path, fake_openai):
    fake_openai.answer = lambda body: "No" if "classification task" in json.dumps(body) else (
        f"Input: case {body.get('seed')}\nOutput: the answer for {json.dumps(body)[-40:]}")
    fake_openai.latency = 0.03
    tasks = [{"id": f"k{i}", "instruction": f"Describe thing number {i} in one sentence."} for i in range(30)]
    in_path = write_jsonl(tmp_path / "in.jsonl", tasks)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [SEED])
    out = tmp_path / "alpaca.jsonl"
    argv = ["respond", "--in", str(in_path), "--seeds", str(seeds), "--out", str(out), "--concurrency", "2",
            "--backend", "openai", "--base-url", fake_openai.base_url, "--model", "fake", "--no-cache"]
    proc = popen(argv, tmp_path)
    _, stderr = interrupt_when(proc, lambda: line_count(out) >= 5)
    assert_interrupted(proc, stderr)
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
