"""Typed stage configs -> command-line flags, and the resolved config written beside each output.

Each stage has one frozen dataclass. Every field has a default and a help text (`option`), so
`--help` writes itself; `add_flags` turns the fields into argparse flags (`batch_size` ->
`--batch-size`) and `from_args` builds the config back. Fields whose names look secret are
never written out.

Bounds live in the field too (`option(0.7, "...", above=0, max=1)`; `above=`/`below=` for strict
bounds, `choices=` for a fixed set), and `validate` checks every one, and that every float is
finite, in one place: each stage's Config calls it from `__post_init__` before its own
cross-field rules, so `--threshold 7` reads the same in every stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import UserError
from pipeline.jsonl import config_path_for, write_json_atomic
from pipeline.urls import redact_urls

SECRET_WORDS = ("key", "token_value", "secret", "password")


# The bound keywords `option` accepts, and how `validate` states each in its one line.
BOUNDS = {"min": (lambda v, b: v >= b, "at least {}"), "max": (lambda v, b: v <= b, "at most {}"),
          "above": (lambda v, b: v > b, "more than {}"), "below": (lambda v, b: v < b, "less than {}")}


def option(default: Any, help: str, *, flag: str | None = None, positional: bool = False, **kwargs) -> Any:
    """A config field with its help text. `flag` overrides the flag name (e.g. '--in').

    `min`/`max` (inclusive), `above`/`below` (strict) and `choices` are checked by `validate`;
    a list field's bounds apply to each item.
    """
    metadata = {"help": help, "flag": flag, "positional": positional, **kwargs}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    hints = typing.get_type_hints(config_cls)
    # A stage's own flags first, then those it inherits (the shared backend flags), in --help.
    own = config_cls.__dict__.get("__annotations__", {})
    fields = sorted(dataclasses.fields(config_cls), key=lambda f: f.name not in own)
    for field in fields:
        if field.metadata.get("hidden"):
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        limits = "; " + bounds_text(field.metadata) if any(name in field.metadata for name in BOUNDS) else ""
        kwargs: dict[str, Any] = {"help": f"{help_text} (default: {default!r}{limits})".replace("%", "%%")}
        if field.metadata.get("positional"):
            names = [field.name]
            kwargs["nargs"] = "?"
        else:
            names = [flag_name(field)]
            kwargs["dest"] = field.name
        kwargs["default"] = default
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(kwargs["choices"][0])
        elif typing.get_origin(tp) in (list, tuple):
            (item_type, *_) = typing.get_args(tp) or (str,)
            kwargs["nargs"] = field.metadata.get("nargs", "+")
            kwargs["type"] = item_type
        else:
            kwargs["type"] = tp
        if field.metadata.get("choices") is not None:
            kwargs["choices"] = list(field.metadata["choices"])
        if optional and tp is not bool:
            kwargs["type"] = _none_or(kwargs.get("type", str))
        parser.add_argument(*names, **kwargs)


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def validate(cfg) -> None:
    """Every field's bounds and choices from its metadata, and no NaN or infinity in any float.

    One UserError naming the flag and the value, as the CLI prints it: `--threshold: 7.0 is not within (0, 1]`.
    """
    literals = _literal_choices(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        metadata = {"choices": literals[field.name], **field.metadata} if field.name in literals else field.metadata
        for item in value if isinstance(value, (list, tuple)) else (value,):
            allowed = value_problem(metadata, item)
            if allowed:  # a hidden field has no flag to name: name the field
                name = field.name if field.metadata.get("hidden") else flag_name(field)
                raise UserError(f"{name}: {item!r} is not {allowed}")


@functools.lru_cache(maxsize=None)
def _literal_choices(config_cls) -> dict[str, tuple]:
    """Field name -> the values its `Literal[...]` type allows (argparse checks flags; this checks the rest)."""
    choices = {}
    for name, tp in typing.get_type_hints(config_cls).items():
        tp, _ = _unwrap_optional(tp)
        if typing.get_origin(tp) is Literal:
            choices[name] = typing.get_args(tp)
    return choices


def value_problem(metadata, value) -> str | None:
    """What a value should have been when it breaks a field's metadata (`within [0, 1]`), or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        return "one of " + ", ".join(map(str, choices))
    if not isinstance(value, (int, float)):
        return None
    broken = [name for name, (holds, _) in BOUNDS.items() if name in metadata and not holds(value, metadata[name])]
    return bounds_text(metadata) if broken else None


def bounds_text(metadata) -> str:
    """`within [0, 1]`, `within (0, 1]`, `at least 1`, ...: the whole allowed range in words."""
    low = ("[", metadata["min"]) if "min" in metadata else ("(", metadata["above"]) if "above" in metadata else None
    high = (metadata["max"], "]") if "max" in metadata else (metadata["below"], ")") if "below" in metadata else None
    if low and high:
        return f"within {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
    if low:
        return (BOUNDS["min"] if low[0] == "[" else BOUNDS["above"])[1].format(f"{low[1]:g}")
    return (BOUNDS["max"] if high[1] == "]" else BOUNDS["below"])[1].format(f"{high[0]:g}")


def from_args(config_cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    for f in dataclasses.fields(config_cls):
        if isinstance(values.get(f.name), list) and f.type and "tuple" in str(f.type):
            values[f.name] = tuple(values[f.name])
    cfg = config_cls(**values)
    validate(cfg)  # every stage's flags, even a Config that does not call it itself
    return cfg


def to_dict(cfg) -> dict:
    """The config as JSON-ready data, with any secret-looking field removed and credentials in
    URLs (`--base-url http://user:key@host`) redacted."""
    out = {}
    for field in dataclasses.fields(cfg):
        if any(word in field.name.lower() for word in SECRET_WORDS):
            continue
        value = getattr(cfg, field.name)
        value = str(value) if isinstance(value, Path) else value
        out[field.name] = redact_urls(value) if isinstance(value, str) else value
    return json.loads(json.dumps(out, default=str))


def write_resolved_config(cfg, output, extra: dict | None = None) -> Path:
    """`<output>.config.json`: the config, what the stage adds (`extra`), and `provenance` (library
    versions, git commit, the redacted command line)."""
    from pipeline.provenance import provenance

    path = config_path_for(output)
    data = {"stage": type(cfg).__module__.rsplit(".", 1)[-1], "config": to_dict(cfg)}
    if extra:
        data.update(extra)
    data["provenance"] = provenance()
    write_json_atomic(path, data)
    return path


# ----------------------------------------------------------------------------- config files
# `--config run.yaml`: a mapping of option names (field names, or the flag spelled with dashes)
# to values. Its values become the stage parser's defaults, so defaults < file < flags, and the
# Config's own checks (`validate`, `__post_init__`) judge them exactly as they judge flags.


def file_key(field: dataclasses.Field) -> str:
    """A field's name in a config file: its flag's (`--in` -> `in`, `--max-tokens` -> `max_tokens`)."""
    return flag_name(field).lstrip("-").replace("-", "_")


def file_options(config_cls) -> dict[str, dataclasses.Field]:
    """The fields a config file may set, by file key: every one with a flag (a hidden tuning knob has none)."""
    return {file_key(f): f for f in dataclasses.fields(config_cls) if not f.metadata.get("hidden")}


def load_config_file(path: str, config_cls, stage: str) -> dict[str, Any]:
    """The file's values, by field name, typed as the fields are; one UserError naming file (and line) otherwise."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a mapping of {stage} options to values, not a {type(data).__name__}")
    fields = file_options(config_cls)
    hints = typing.get_type_hints(config_cls)
    values = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in fields:
            raise UserError(f"{path}: {key}: not an option of `{stage}` (python -m pipeline {stage} --help lists them)")
        field = fields[name]
        values[field.name] = _typed(path, key, hints[field.name], value)
    return values


def _typed(path: str, key, tp, value):
    """A YAML value as the field's type wants it (a list for a tuple field, 1 for a float); one line otherwise."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{path}: {key}: needs a value")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(tp) or (str,)
        items = value if isinstance(value, list) else [value]
        typed = [_typed(path, key, item_type, item) for item in items]
        return tuple(typed) if origin is tuple else typed
    if origin is Literal:
        return value  # `validate` names the allowed values
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str, int, float)}.get(tp)
    if expected is None:
        return value
    if isinstance(value, bool) and tp is not bool or not isinstance(value, expected):
        raise UserError(f"{path}: {key}: {value!r} is not {TYPE_WORDS[tp]}")
    return tp(value)


TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def config_yaml(cfg, stage: str) -> str:
    """The resolved config as the YAML `--config` reads back (what `--print-config` prints)."""
    import yaml

    values = to_dict(cfg)  # secret-named fields are left out here too
    shown = {key: values[f.name] for key, f in file_options(type(cfg)).items() if f.name in values}
    header = f"# python -m pipeline {stage} --config THIS_FILE (flags given as well override it)\n"
    return header + yaml.safe_dump(shown, sort_keys=False, allow_unicode=True)
