"""pipeline/cli.py and pipeline/config.py: flags from typed configs, one-line errors, exit codes."""

import json
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


def test_unknown_flag_and_bad_choice_fail():
    with pytest.raises(SystemExit):
        parse("--nope", "1")
    with pytest.raises(SystemExit):
        parse("--mode", "z")
    with pytest.raises(SystemExit):
        parse("--num-items", "many")


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
