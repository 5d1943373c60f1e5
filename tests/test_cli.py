"""pipeline/cli.py and pipeline/config.py: flags from typed configs, one-line errors, exit codes."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import argparse
import pytest

from pipeline import cli
from pipeline.config import add_flags, config_path_for, from_args, option, to_dict, write_resolved_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, **kwargs):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True, **kwargs)


@dataclass(frozen=True)
class DemoConfig:
    in_path: str = option("a.jsonl", "input file", flag="--in")
    num_items: int = option(3, "how many")
    ratio: float = option(0.5, "a ratio")
    mode: Literal["x", "y"] = option("x", "which mode")
    cache: bool = option(True, "use the cache")
    names: list[str] = option(["a"], "some names")
    limit: int | None = option(None, "optional limit")
    api_key_hint: str = option("", "must never be written out")


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_flags(parser, DemoConfig)
    return from_args(DemoConfig, parser.parse_args(list(argv)))


def test_flags_come_from_fields():
    assert parse() == DemoConfig()
    cfg = parse("--in", "b.jsonl", "--num-items", "7", "--ratio", "0.25", "--mode", "y", "--no-cache",
                "--names", "p", "q", "--limit", "5")
    assert cfg == DemoConfig("b.jsonl", 7, 0.25, "y", False, ["p", "q"], 5)


@pytest.mark.parametrize("argv, says", [
    (("--nope", "1"), "unrecognized arguments: --nope 1"),
    (("--mode", "z"), "argument --mode: invalid choice: 'z' (choose from 'x', 'y')"),
    (("--num-items", "many"), "argument --num-items: invalid int value: 'many'"),
])
def test_unknown_flag_and_bad_choice_fail(argv, says, capsys):
    with pytest.raises(SystemExit, match="^2$"):
        parse(*argv)
    assert says in capsys.readouterr().err


def test_resolved_config_has_no_secrets(tmp_path):
    out = tmp_path / "out.jsonl"
    path = write_resolved_config(DemoConfig(), out)
    assert path == tmp_path / "out.config.json"
    data = json.loads(path.read_text())
    assert data["config"]["num_items"] == 3
    assert "api_key_hint" not in data["config"]
    assert "api_key_hint" not in to_dict(DemoConfig())
    assert config_path_for(tmp_path) == tmp_path / "config.json"


def test_every_stage_has_help():
    for stage in cli.STAGES:
        result = run_cli(stage, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: python -m pipeline " + stage in result.stdout
    top = run_cli("--help")
    assert top.returncode == 0 and all(stage in top.stdout for stage in cli.STAGES)


def test_bad_input_to_filter_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{"instruction": "b"}\n{"instruction": oops\n')
    out = tmp_path / "out.jsonl"
    result = run_cli("filter", "--in", str(bad), "--out", str(out))
    assert result.returncode == 2
    assert f"{bad}:3" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_does_not_import_torch():
    code = "import sys; from pipeline import cli; cli.build_parser(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr


# A stage that is slow to stop after the first signal, as one waiting on requests in flight is.
SLOW_TO_STOP = """
import time
from pipeline import cli
try:
    with cli._StopSignals():
        print("running", flush=True)
        time.sleep(60)
except KeyboardInterrupt as e:
    print("stopping", type(e).__name__, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("first, stopped_as, code", [("SIGINT", "KeyboardInterrupt", cli.EXIT_INTERRUPTED),
                                                     ("SIGTERM", "Terminated", cli.EXIT_TERMINATED)])
def test_a_second_signal_while_stopping_exits_at_once_with_one_line(first, stopped_as, code):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", SLOW_TO_STOP], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "running\n"
    proc.send_signal(getattr(signal, first))
    assert proc.stdout.readline() == f"stopping {stopped_as}\n", "the first signal stops the stage cleanly"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10, "the second signal does not wait for the clean stop"
    assert proc.returncode == code
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "stopped at once (signalled again): outputs written so far are valid; rerun the same command to resume"]


def test_signal_handlers_are_restored_after_a_run(tmp_path, monkeypatch):
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["mix", "--in", "absent.jsonl"]) == cli.EXIT_USER_ERROR
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_full_disk_outside_the_jsonl_writers_is_one_line(tmp_path, capsys, monkeypatch):
    """A model's weights or a plot written by a library: its ENOSPC still ends in one line, exit 2."""
    import errno

    from pipeline import mix

    def run_out_of_room(cfg, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/sft/model.safetensors")

    monkeypatch.setattr(mix, "run", run_out_of_room)
    assert cli.main(["mix", "--in", "a.jsonl"]) == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: runs/sft/model.safetensors: No space left on device; outputs written so far are valid; "
        "rerun the same command to resume once there is room"]
