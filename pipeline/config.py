"""Typed stage configs -> command-line flags, and the resolved config written beside each output.

Each stage has one frozen dataclass. Every field has a default and a help text (`option`), so
`--help` writes itself; `add_flags` turns the fields into argparse flags (`batch_size` ->
`--batch-size`) and `from_args` builds the config back. Fields whose names look secret are
never written out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pipeline.jsonl import path_beside, write_json_atomic

SECRET_WORDS = ("key", "token_value", "secret", "password")


def option(default: Any, help: str, *, flag: str | None = None, positional: bool = False, **kwargs) -> Any:
    """A config field with its help text. `flag` overrides the flag name (e.g. '--in')."""
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
        kwargs: dict[str, Any] = {"help": f"{help_text} (default: {default!r})".replace("%", "%%")}
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
        if optional and tp is not bool:
            kwargs["type"] = _none_or(kwargs.get("type", str))
        parser.add_argument(*names, **kwargs)


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def from_args(config_cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    for f in dataclasses.fields(config_cls):
        if isinstance(values.get(f.name), list) and f.type and "tuple" in str(f.type):
            values[f.name] = tuple(values[f.name])
    return config_cls(**values)


def to_dict(cfg) -> dict:
    """The config as JSON-ready data, with any secret-looking field removed."""
    out = {}
    for field in dataclasses.fields(cfg):
        if any(word in field.name.lower() for word in SECRET_WORDS) and "max_tokens" not in field.name:
            continue
        value = getattr(cfg, field.name)
        out[field.name] = str(value) if isinstance(value, Path) else value
    return json.loads(json.dumps(out, default=str))


def config_path_for(output) -> Path:
    """`data/x.jsonl` -> `data/x.config.json`; a folder `runs/sft` -> `runs/sft/config.json`."""
    output = Path(output)
    if output.is_dir():
        return output / "config.json"
    return path_beside(output, "config.json")


def write_resolved_config(cfg, output, extra: dict | None = None) -> Path:
    path = config_path_for(output)
    data = {"stage": type(cfg).__module__.rsplit(".", 1)[-1], "config": to_dict(cfg)}
    if extra:
        data.update(extra)
    write_json_atomic(path, data)
    return path
