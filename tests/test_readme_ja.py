"""README.ja.md cannot drift: every `make` target and variable, every `python -m pipeline` stage
and every `--flag` it shows exists in the Makefile and in that stage's `--help`."""

import argparse
import importlib
import re
import shlex
from functools import cache
from pathlib import Path

from pipeline.cli import STAGES
from pipeline.config import add_flags

ROOT = Path(__file__).resolve().parents[1]
README_JA = ROOT / "README.ja.md"
MAKEFILE = ROOT / "Makefile"

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")
_RULE = re.compile(r"^([A-Za-z][\w.-]*)[ \t]*:(?!=)", re.MULTILINE)
_VARIABLE = re.compile(r"^([A-Z][A-Z0-9_]*)[ \t]*[?:+]?=", re.MULTILINE)
_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
_ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=")


def make_targets() -> set[str]:
    text = MAKEFILE.read_text(encoding="utf-8")
    return set(_RULE.findall(text)) - {".PHONY"}


def make_variables() -> set[str]:
    return set(_VARIABLE.findall(MAKEFILE.read_text(encoding="utf-8")))


def environment_variables() -> set[str]:
    """The environment variables the code reads (`os.environ.get("OPENAI_API_KEY")`)."""
    source = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "pipeline").glob("*.py"))
    return set(re.findall(r"environ(?:\.get)?[(\[]\s*\"([A-Z][A-Z0-9_]*)\"", source))


@cache
def stage_flags(stage: str) -> frozenset[str]:
    """The flags `python -m pipeline STAGE --help` lists, built the way the CLI builds them."""
    parser = argparse.ArgumentParser(prog=stage)
    add_flags(parser, importlib.import_module(STAGES[stage][0]).Config)
    return frozenset(_FLAG.findall(parser.format_help()))


def code_pieces(markdown: str) -> list[str]:
    """Every line of every fenced block, and every inline code span outside them, comments cut."""
    pieces = [line for block in _FENCE.findall(markdown) for line in block.splitlines()]
    pieces += _INLINE.findall(_FENCE.sub("", markdown))
    return [piece.split(" #")[0].strip() for piece in pieces if piece.split(" #")[0].strip()]


def problems(markdown: str) -> tuple[list[str], dict[str, int]]:
    """What in `markdown` names no real target, variable, stage or flag; and how much was checked."""
    found, checked = [], {"make": 0, "stage": 0, "flag": 0, "variable": 0}
    targets, variables, environment = make_targets(), make_variables(), environment_variables()
    for piece in code_pieces(markdown):
        try:
            words = shlex.split(piece)
        except ValueError:
            words = piece.split()
        if words[:1] == ["export"]:
            checked["variable"] += 1
            name = words[1].split("=")[0]
            if name not in environment:
                found.append(f"{piece}: the code reads no environment variable {name}")
        elif words[:1] == ["make"]:
            checked["make"] += 1
            for word in words[1:]:
                assignment = _ASSIGNMENT.match(word)
                if assignment:
                    checked["variable"] += 1
                    if assignment[1] not in variables:
                        found.append(f"{piece}: no Make variable {assignment[1]}")
                elif not word.startswith("-") and word not in targets:
                    found.append(f"{piece}: no Make target {word}")
        elif "pipeline" in words and words[words.index("pipeline") - 1] == "-m":
            checked["stage"] += 1
            stage = words[words.index("pipeline") + 1]
            if stage not in STAGES:
                found.append(f"{piece}: no stage {stage}")
                continue
            for flag in _FLAG.findall(" ".join(words)):
                checked["flag"] += 1
                if flag not in stage_flags(stage) | {"--help"}:
                    found.append(f"{piece}: {stage} has no flag {flag}")
        elif re.fullmatch(r"--[a-z0-9-]+", piece):  # a flag named in prose: some stage must have it
            checked["flag"] += 1
            if not any(piece in stage_flags(stage) for stage in STAGES):
                found.append(f"{piece}: no stage has this flag")
        elif re.fullmatch(r"[A-Z][A-Z0-9_]+", piece) and piece not in {"FILE", "STAGE"}:
            checked["variable"] += 1  # a Make variable or an environment variable named in prose
            if piece not in variables | environment:
                found.append(f"{piece}: no Make variable {piece}")
    return found, checked


def test_every_command_in_readme_ja_exists():
    found, checked = problems(README_JA.read_text(encoding="utf-8"))
    assert found == []
    # The guide shows the two commands, the stages and their flags: if parsing found none, the check is empty.
    assert checked["make"] >= 8 and checked["stage"] >= 8 and checked["flag"] >= 10 and checked["variable"] >= 10, checked


def test_the_checker_catches_a_wrong_target_variable_stage_and_flag():
    markdown = ("`make demoo`\n```sh\nmake generate NN=5\npython -m pipeline filtr\n"
                "python -m pipeline filter --treshold 0.7\nexport OPENAI_KEY=x\n```\n`--no-such-flag` と `CONCURENCY`\n")
    found, _ = problems(markdown)
    assert found == ["make generate NN=5: no Make variable NN",
                     "python -m pipeline filtr: no stage filtr",
                     "python -m pipeline filter --treshold 0.7: filter has no flag --treshold",
                     "export OPENAI_KEY=x: the code reads no environment variable OPENAI_KEY",
                     "make demoo: no Make target demoo",
                     "--no-such-flag: no stage has this flag",
                     "CONCURENCY: no Make variable CONCURENCY"]


def test_readme_ja_says_the_embedded_model_writes_no_usable_japanese():
    text = README_JA.read_text(encoding="utf-8")
    assert "使いものになる日本語を書けません" in text
    assert "OPENAI_BASE_URL" in text and "OPENAI_API_KEY" in text and "BACKEND=openai" in text
    assert "make demo" in text and "make test" in text
