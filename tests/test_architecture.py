"""The house rules that keep `pipeline/` readable, checked on its source with `ast`.

- No stage module imports another stage module, at the top or inside a function: stages talk
  through files, and a rule two stages share lives in a small module below both
  (`heuristics`, `records`, `plots`, ...).
- No function is longer than MAX_FUNCTION_LINES: a longer one is split into steps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
PACKAGE = "pipeline"
STAGES = frozenset({"generate", "filter", "respond", "finetune", "eval", "inspect", "convert", "mix",
                    "judge", "prefs", "label", "dpo"})
MAX_FUNCTION_LINES = 80


def sources() -> list[Path]:
    return sorted(PIPELINE.glob("*.py"))


def imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module under `pipeline`) for every import anywhere in the tree, function bodies included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` or `from .x import y`, inside the package
                base = PACKAGE + ("." + node.module if node.module else "")
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            if base == PACKAGE:  # `from pipeline import filter`: the names are modules
                found += [(node.lineno, f"{PACKAGE}.{alias.name}") for alias in node.names]
    return [(line, name.split(".")[1]) for line, name in found if name.startswith(PACKAGE + ".")]


def stage_imports(path: Path) -> list[str]:
    """'file:line imports stage' for each import of another stage in a stage module's source."""
    this = path.stem
    if this not in STAGES:
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{path.name}:{line} imports pipeline.{module}" for line, module in imported_modules(tree)
            if module in STAGES and module != this]


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_the_checks_see_imports_inside_functions_and_every_import_form():
    code = ("import pipeline.generate\n"
            "def f():\n    from pipeline.filter import x\n"
            "def g():\n    from pipeline import respond, jsonl\n"
            "def h():\n    from .mix import y\n    from . import eval\n")
    modules = [module for _, module in imported_modules(ast.parse(code))]
    assert {"generate", "filter", "respond", "jsonl", "mix", "eval"} <= set(modules)


def test_the_function_length_check_counts_a_long_function(tmp_path):
    path = tmp_path / "long.py"
    path.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\ndef g():\n    return 1\n", encoding="utf-8")
    assert long_functions(path) == [f"long.py:1 f: {MAX_FUNCTION_LINES + 1} lines"]


def test_the_stage_list_names_real_modules():
    present = {path.stem for path in sources()}
    assert {"generate", "filter", "respond", "finetune", "eval", "inspect", "convert", "mix"} <= present


def test_no_stage_module_imports_another_stage_module():
    offenders = [line for path in sources() for line in stage_imports(path)]
    assert offenders == [], "move the shared rule into a module below both stages:\n" + "\n".join(offenders)


@pytest.mark.parametrize("path", sources(), ids=lambda path: path.name)
def test_no_function_is_longer_than_the_limit(path):
    assert long_functions(path) == [], f"split these into steps of at most {MAX_FUNCTION_LINES} lines"
