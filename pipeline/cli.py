"""`python -m pipeline STAGE [flags]` (also `self-instruct STAGE`): a thin layer over each stage's `run`.

Each stage module defines `Config` (a frozen dataclass whose fields are the flags) and
`run(cfg)`. This file only parses flags, calls `run`, and turns a UserError into one line on
stderr with exit code 2. Every stage also takes `--config FILE.yaml` (its options as a YAML
mapping; defaults < file < flags, checked as flags are: `config.load_config_file`) and
`--print-config` (the resolved options as that YAML, then exit). Stage modules import heavy libraries (torch, transformers) inside the
functions that need them, so `--help` and the filter start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys

from pipeline.config import add_flags, config_yaml, from_args, load_config_file
from pipeline.errors import NO_SPACE_ERRNOS, UserError
from pipeline.provenance import set_command_line

STAGES = {
    "generate": ("pipeline.generate", "bootstrap new instructions from the seed tasks"),
    "filter": ("pipeline.filter", "drop near-duplicate instructions by ROUGE-L, plus heuristics"),
    "respond": ("pipeline.respond", "write inputs and outputs for the kept instructions (Alpaca JSONL)"),
    "finetune": ("pipeline.finetune", "supervised fine-tuning on the response tokens"),
    "eval": ("pipeline.eval", "loss, token accuracy, exact match, BLEU and ROUGE-L on held-out data"),
    "inspect": ("pipeline.inspect", "summarise any stage's JSONL; plots and an HTML report"),
    "convert": ("pipeline.convert", "turn task datasets and dialogue logs into instruction data"),
    "mix": ("pipeline.mix", "combine instruction files with weights, deduplicated across sources"),
    "judge": ("pipeline.judge", "score every record 1-5 with an LLM judge; --min-score keeps low scores out"),
    "prefs": ("pipeline.prefs", "preference pairs: K policy answers, the judge's best as chosen, worst as rejected"),
    "label": ("pipeline.label", "a person picks the better answer of each preference pair (keys 1, 2, t, s, q)"),
    "dpo": ("pipeline.dpo", "preference tuning (DPO, or reference-free SimPO) on chosen / rejected pairs"),
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports `kill` (and as systemd, Docker and Slurm expect)
RESUME_HINT = "outputs written so far are valid; rerun the same command to resume"


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopped the way Ctrl-C stops a stage: outputs closed, one line, then exit 143."""


class _StopSignals:
    """SIGINT and SIGTERM during a stage: the first stops it cleanly (a KeyboardInterrupt the stage
    unwinds through); a second one while it is still stopping (waiting on requests in flight, say)
    exits at once with one line. That is safe: append logs hold whole records and atomic writes
    hold the old file or the new one, at every instant."""

    def __init__(self):
        self.first: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        with contextlib.suppress(ValueError):  # signals can only be caught on the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.first is not None:
            return  # stopping: a second signal must still exit at once, through the final message and thread joins
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.first is None:
            self.first = signum
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        code = EXIT_TERMINATED if self.first == signal.SIGTERM else EXIT_INTERRUPTED
        with contextlib.suppress(OSError):
            os.write(sys.stderr.fileno(), f"\nstopped at once (signalled again): {RESUME_HINT}\n".encode())
        os._exit(code)


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
        files = stage_parser.add_argument_group("config files")
        files.add_argument("--config", dest="_config_file", metavar="FILE.yaml", default=None,
                           help="read options from a YAML mapping (option: value); flags given as well override it")
        files.add_argument("--print-config", dest="_print_config", action="store_true",
                           help="print the resolved options as YAML (what --config reads) and exit")
        stage_parser.set_defaults(_module=module, _parser=stage_parser, _stage=name)
    return parser


def resolve(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> argparse.Namespace:
    """The flags, over the --config file's values, over the defaults: the file's values become the
    stage parser's defaults and the flags are parsed again on top of them."""
    if args._config_file:
        values = load_config_file(args._config_file, args._module.Config, args._stage)
        args._parser.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = args._module
    set_command_line(list(sys.argv[1:] if argv is None else argv))
    message = code = None
    try:
        with _StopSignals():
            args = resolve(parser, argv, args)
            cfg = from_args(module.Config, args)
            if args._print_config:
                print(config_yaml(cfg, args._stage), end="")
                return 0
            module.run(cfg)
    except UserError as e:
        message, code = f"error: {e}", EXIT_USER_ERROR
    except Terminated:
        message, code = f"terminated: {RESUME_HINT}", EXIT_TERMINATED
    except KeyboardInterrupt:
        message, code = f"interrupted: {RESUME_HINT}", EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        # A write outside jsonl (a model's weights, a plot) ran out of room: still one line.
        message, code = f"error: {e.filename or 'a write'}: {e.strerror}; {RESUME_HINT} once there is room", EXIT_USER_ERROR
    if message is None:
        return 0
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        # The stage's frames are gone now; collecting them closes its progress bars, which print
        # their last state as they close, so the message comes after them, as the last line.
        # (Only here: with torch loaded a full collection costs ~0.1 s.)
        gc.collect()
    sys.stderr.flush()
    print(f"\n{message}" if code in (EXIT_INTERRUPTED, EXIT_TERMINATED) else message, file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
