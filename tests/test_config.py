"""pipeline/config.py: bounds and choices declared once in field metadata, checked by `validate`."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.config import bounds_text, option, validate
from pipeline.errors import UserError
from pipeline.provenance import redact_command


@dataclass(frozen=True)
class Bounded:
    threshold: float = option(0.7, "a share", min=0, max=1)
    rate: float = option(1e-4, "a step size", above=0)
    fraction: float = option(0.1, "held out", min=0, below=1)
    count: int = option(1, "how many", min=1)
    weights: tuple[float, ...] = option((1.0,), "one per file", min=0)
    language: str = option("en", "a language", choices=("en", "ja"))
    limit: int | None = option(None, "optional", min=1)


@pytest.mark.parametrize("changes, message", [
    ({"threshold": 1.5}, "--threshold: 1.5 is not within [0, 1]"),
    ({"threshold": -0.0001}, "--threshold: -0.0001 is not within [0, 1]"),
    ({"rate": 0.0}, "--rate: 0.0 is not more than 0"),
    ({"fraction": 1.0}, "--fraction: 1.0 is not within [0, 1)"),
    ({"count": 0}, "--count: 0 is not at least 1"),
    ({"weights": (1.0, -2.0)}, "--weights: -2.0 is not at least 0"),
    ({"weights": (float("nan"),)}, "--weights: nan is not a finite number"),
    ({"rate": float("inf")}, "--rate: inf is not a finite number"),
    ({"language": "fr"}, "--language: 'fr' is not one of en, ja"),
    ({"limit": 0}, "--limit: 0 is not at least 1"),
])
def test_each_bound_is_checked_and_named(changes, message):
    with pytest.raises(UserError) as caught:
        validate(Bounded(**changes))
    assert str(caught.value) == message


def test_values_on_a_bound_pass():
    validate(Bounded(threshold=0.0, rate=1e-12, fraction=0.0, count=1, weights=(0.0, 2.5), language="ja", limit=None))
    validate(Bounded(threshold=1.0, fraction=0.999))


def test_bounds_read_as_words():
    assert bounds_text({"min": 0, "max": 1}) == "within [0, 1]"
    assert bounds_text({"above": 0, "max": 1}) == "within (0, 1]"
    assert bounds_text({"min": 0}) == "at least 0"
    assert bounds_text({"below": 2}) == "less than 2"


def float_flags():
    """Every float flag of every stage, found from the Configs, so a new one is covered at once."""
    for stage, (module_name, _) in cli.STAGES.items():
        config_cls = importlib.import_module(module_name).Config
        hints = typing.get_type_hints(config_cls)
        for field in dataclasses.fields(config_cls):
            tp = hints[field.name]
            if field.metadata.get("hidden"):
                continue
            if float in (tp, *typing.get_args(tp)) or typing.get_args(tp)[:1] == (float,):
                yield stage, "--" + field.name.replace("_", "-") if not field.metadata.get("flag") else field.metadata["flag"]


FLOAT_FLAGS = list(float_flags())
# What each stage needs so that only the flag under test is wrong.
REQUIRED = {"convert": ["--kind", "qa", "--in", "x.csv"], "mix": ["--in", "a.jsonl"]}


def test_every_stage_has_float_flags_to_check():
    assert {"generate", "filter", "respond", "finetune", "mix"} <= {stage for stage, _ in FLOAT_FLAGS}
    assert ("finetune", "--lr") in FLOAT_FLAGS and ("finetune", "--weight-decay") in FLOAT_FLAGS


@pytest.mark.parametrize("stage, flag", FLOAT_FLAGS, ids=[f"{s}{f}" for s, f in FLOAT_FLAGS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_finite_values(stage, flag, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main([stage, *REQUIRED.get(stage, []), f"{flag}={value}"])  # `=`: argparse reads "-inf" as a flag
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], "refused before anything was written"


def test_the_near_duplicate_threshold_is_one_default_and_one_rule_in_every_stage(capsys, tmp_path, monkeypatch):
    from pipeline.similarity import NEAR_DUPLICATE_THRESHOLD

    monkeypatch.chdir(tmp_path)
    for stage, extra in [("generate", []), ("filter", []), ("mix", ["--in", "a.jsonl"])]:
        config_cls = importlib.import_module(f"pipeline.{stage}").Config
        field = next(f for f in dataclasses.fields(config_cls) if f.name == "threshold")
        assert field.default == NEAR_DUPLICATE_THRESHOLD == 0.7
        for value, verdict in [("0", "is not within (0, 1]"), ("1.01", "is not within (0, 1]"), ("nan", "is not a finite number")]:
            assert cli.main([stage, *extra, "--threshold", value]) == cli.EXIT_USER_ERROR
            assert capsys.readouterr().err.strip() == f"error: --threshold: {float(value)!r} {verdict}"


def test_help_states_each_bound(capsys):
    with pytest.raises(SystemExit, match="^0$"):
        cli.main(["filter", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.7; within (0, 1])" in text and "(default: 3; at least 0)" in text


# ----------------------------------------------------------------------------- --config FILE.yaml, --print-config

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [
    {"id": "m1", "instruction": "Explain why the sky is blue in one sentence."},
    {"id": "m2", "instruction": "Explain why the sky is blue in one sentence!"},
    {"id": "m3", "instruction": "富士山の高さを教えてください。"},
    {"id": "m4", "instruction": "富士山の高さを教えてください！"},
    {"id": "m5", "instruction": "Write a limerick about a cat who loves soup."},
]
SEEDS = [{"id": "s1", "instruction": "Write a haiku about rain.", "is_classification": False,
          "instances": [{"input": "", "output": "Rain taps the window"}]}]


def write_lines(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def printed_config(argv, capsys) -> dict:
    assert cli.main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_a_filter_run_from_a_yaml_file_equals_the_same_run_from_flags(tmp_path, capsys):
    candidates = write_lines(tmp_path / "in.jsonl", CANDIDATES)
    seeds = write_lines(tmp_path / "seeds.jsonl", SEEDS)
    by_flags, by_file = tmp_path / "flags.jsonl", tmp_path / "file.jsonl"
    assert cli.main(["filter", "--in", str(candidates), "--seeds", str(seeds), "--out", str(by_flags),
                     "--threshold", "0.8", "--min-words", "2"]) == 0
    config = tmp_path / "filter.yaml"
    config.write_text(f"in: {candidates}\nseeds: {seeds}\nout: {by_file}\nthreshold: 0.8\nmin-words: 2\n", encoding="utf-8")
    assert cli.main(["filter", "--config", str(config)]) == 0
    capsys.readouterr()
    assert by_file.read_text(encoding="utf-8") == by_flags.read_text(encoding="utf-8")
    assert "富士山" in by_file.read_text(encoding="utf-8")
    rejected = [json.loads(line) for line in (tmp_path / "file.rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rejected == [json.loads(line) for line in (tmp_path / "flags.rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["id"] for r in rejected} == {"m2", "m4"}
    saved = [json.loads((tmp_path / name).read_text(encoding="utf-8"))["config"] for name in ("flags.config.json", "file.config.json")]
    assert {**saved[0], "out": None} == {**saved[1], "out": None}


def test_defaults_then_the_file_then_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("threshold: 0.5\nmax_words: 99\n", encoding="utf-8")
    default = printed_config(["filter", "--print-config"], capsys)
    from_file = printed_config(["filter", "--config", str(config), "--print-config"], capsys)
    overridden = printed_config(["filter", "--config", str(config), "--threshold", "0.6", "--print-config"], capsys)
    assert (default["threshold"], default["max_words"]) == (0.7, 150)
    assert (from_file["threshold"], from_file["max_words"]) == (0.5, 99)
    assert (overridden["threshold"], overridden["max_words"]) == (0.6, 99)


# The flags a stage cannot do without (it has no default input).
REQUIRED = {"convert": ["--in", "dolly.jsonl"], "mix": ["--in", "a.jsonl", "b.jsonl", "--weights", "1", "0.5"]}


@pytest.mark.parametrize("stage", sorted(cli.STAGES))
def test_print_config_reads_back_as_the_same_config(stage, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # stages whose defaults need a key to validate
    assert cli.main([stage, *REQUIRED.get(stage, []), "--print-config"]) == 0
    printed = capsys.readouterr().out
    config = tmp_path / f"{stage}.yaml"
    config.write_text(printed, encoding="utf-8")
    assert cli.main([stage, "--config", str(config), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_print_config_never_shows_a_url_credential(capsys):
    printed = printed_config(["respond", "--base-url", "http://user:hunter2@127.0.0.1:9/v1", "--print-config"], capsys)
    assert "hunter2" not in json.dumps(printed) and "127.0.0.1:9" in printed["base_url"]


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "{path}: bogus: not an option of `filter` (python -m pipeline filter --help lists them)"),
    ("threshold: 0.5\n  max_words: [1\n", "{path}:2: not valid YAML"),
    ("threshold: 7\n", "--threshold: 7.0 is not within (0, 1]"),
    ("min_words: many\n", "{path}: min_words: 'many' is not a whole number"),
    ("heuristics: 3\n", "{path}: heuristics: 3 is not true or false"),
    ("tokenizer: fancy\n", "--tokenizer: 'fancy' is not one of multilingual, rouge"),
    ("- threshold\n", "{path}: must be a mapping of filter options to values, not a list"),
])
def test_a_bad_config_file_is_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    assert cli.main(["filter", "--config", str(path)]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message.format(path=path)) and "\n" not in err


def test_the_same_bound_reads_the_same_from_a_flag_and_from_a_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("threshold: 7\n", encoding="utf-8")
    assert cli.main(["filter", "--config", str(path)]) == cli.EXIT_USER_ERROR
    from_file = capsys.readouterr().err
    assert cli.main(["filter", "--threshold", "7"]) == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err == from_file


def test_a_japanese_value_in_a_config_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("out: データ/出力.jsonl\n", encoding="utf-8")
    assert printed_config(["filter", "--config", str(path), "--print-config"], capsys)["out"] == "データ/出力.jsonl"


# ----------------------------------------------------------------------------- provenance in *.config.json


def test_the_resolved_config_records_versions_commit_and_the_redacted_command(tmp_path, capsys):
    candidates = write_lines(tmp_path / "in.jsonl", CANDIDATES)
    seeds = write_lines(tmp_path / "seeds.jsonl", SEEDS)
    out = tmp_path / "kept.jsonl"
    assert cli.main(["filter", "--in", str(candidates), "--seeds", str(seeds), "--out", str(out)]) == 0
    saved = json.loads((tmp_path / "kept.config.json").read_text(encoding="utf-8"))["provenance"]
    assert saved["command"] == f"python -m pipeline filter --in {candidates} --seeds {seeds} --out {out}"
    assert saved["libraries"]["self-instruct-pipeline"] and saved["libraries"]["torch"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit it is at (`+dirty` with local edits)
        assert saved["git_commit"].split("+")[0] == head.stdout.strip()
    else:
        assert saved["git_commit"] is None


def test_without_git_the_commit_is_null_and_nothing_fails():
    code = "from pipeline.provenance import git_commit; print(git_commit())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PATH": "/nonexistent"}, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "None"


def test_the_command_line_keeps_no_secret():
    argv = ["respond", "--api-key", "sk-live-1", "--base-url", "http://user:pw@host:8000/v1?api_key=abc",
            "--password=letmein", "--max-tokens", "5", "--out", "データ.jsonl"]
    shown = redact_command(argv)
    assert shown == ["respond", "--api-key", "[redacted]", "--base-url", shown[4], "--password=[redacted]",
                     "--max-tokens", "5", "--out", "データ.jsonl"]
    assert "pw@" not in shown[4] and "abc" not in shown[4] and "host:8000" in shown[4]
