"""`python -m pipeline STAGE [flags]` (also `self-instruct STAGE`): a thin layer over each stage's `run`.

Each stage module defines `Config` (a frozen dataclass whose fields are the flags) and
`run(cfg)`. This file only parses flags, calls `run`, and turns a UserError into one line on
stderr with exit code 2. Stage modules import heavy libraries (torch, transformers) inside the
functions that need them, so `--help` and the filter start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from pipeline.config import add_flags, from_args
from pipeline.errors import UserError

STAGES = {
    "generate": ("pipeline.generate", "bootstrap new instructions from the seed tasks"),
    "filter": ("pipeline.filter", "drop near-duplicate instructions by ROUGE-L, plus heuristics"),
    "respond": ("pipeline.respond", "write inputs and outputs for the kept instructions (Alpaca JSONL)"),
    "finetune": ("pipeline.finetune", "supervised fine-tuning on the response tokens"),
    "eval": ("pipeline.eval", "loss, token accuracy, exact match, BLEU and ROUGE-L on held-out data"),
    "inspect": ("pipeline.inspect", "summarise any stage's JSONL; plots and an HTML report"),
    "convert": ("pipeline.convert", "turn task datasets and dialogue logs into instruction data"),
    "mix": ("pipeline.mix", "combine instruction files with weights, deduplicated across sources"),
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Self-Instruct: seed tasks -> instructions -> filter -> responses -> fine-tune -> eval.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (module_name, summary) in STAGES.items():
        module = importlib.import_module(module_name)
        stage_parser = sub.add_parser(name, help=summary, description=(module.__doc__ or summary).strip().split("\n\n")[0])
        add_flags(stage_parser, module.Config)
        stage_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = args._module
    message = code = None
    try:
        cfg = from_args(module.Config, args)
        module.run(cfg)
    except UserError as e:
        message, code = f"error: {e}", EXIT_USER_ERROR
    except KeyboardInterrupt:
        message, code = "interrupted: outputs written so far are valid; rerun the same command to resume", EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    if message is None:
        return 0
    if code == EXIT_INTERRUPTED:
        # The stage's frames are gone now; collecting them closes its progress bars, which print
        # their last state as they close, so the message comes after them, as the last line.
        # (Only here: with torch loaded a full collection costs ~0.1 s.)
        gc.collect()
    sys.stderr.flush()
    print(f"\n{message}" if code == EXIT_INTERRUPTED else message, file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
