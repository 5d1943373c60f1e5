"""The training loop's parts that do not depend on the loss: one step, validation, checkpoints.

`finetune` (supervised cross-entropy) builds on these, and a preference stage (DPO) can too:
it brings its own loss module and its own batches, and reuses the rest unchanged.

- `Trainer`: the accelerator, the loss module (an `nn.Module` whose forward takes a batch's
  tensors and returns `(loss_sum, correct, units)`: the loss summed over the units it is
  averaged over, e.g. response tokens), the optimizer and the learning-rate schedule.
- `train_step`: one optimizer step over this process's micro-batches, averaged over the units
  of the whole global step (all micro-batches, all processes), stopping with one line when the
  loss is not finite.
- `validate`: the mean loss per unit over batches, summed over processes.
- Checkpoints in `<output-dir>/checkpoints/step-<digits>/`: weights (or the adapter), optimizer,
  scheduler and RNG state, and `trainer_state.json` with the step, the settings that must match
  on resume and the run's total steps. A save goes to `step-N.tmp` and is renamed when whole,
  so a kill mid-save leaves a `.tmp` folder that the next run removes and never reads.
- `claim_checkpoints`: a new run refuses a folder holding another run's checkpoints unless told
  to `--resume` it or `--overwrite` it.
- The model in and out: `load_training_tokenizer`, `load_training_model` (fp32, LoRA-wrapped),
  `save_model` (merged with `--merge`, the tokenizer with the serving chat template), and the
  data file's digest a checkpoint records (`file_digest`).

torch and accelerate are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pipeline.config import option
from pipeline.errors import UserError
from pipeline.jsonl import write_json_atomic

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
KEEP_CHECKPOINTS = 2  # older ones are removed: each is the model plus 2x its size in Adam state
STEP_NAME = re.compile(r"step-(\d+)")  # a whole checkpoint; `step-N.tmp` is a save cut short
STEP_DIGITS = 6  # step-000200: names sort in step order in a file listing
PARTIAL_SUFFIX = ".tmp"
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs
FLOAT32_MAX = 3.4028234663852886e38  # a learning rate above it cannot be applied to fp32 weights
# Throughput over a step shorter than this is not measured, only guarded against division by 0.
MIN_ELAPSED_S = 1e-9


# ----------------------------------------------------------------------------- set-up

def make_accelerator(device: str, precision: str, report_to: str = "none", logging_dir: Path | None = None):
    """An Accelerator on `device` (auto: the best here) and the precision to train in (bf16 or fp32).

    Mixed precision is plain torch autocast rather than Accelerator(mixed_precision=...):
    accelerate's state is process-wide and refuses a second run in the same process (the
    benchmark, tests) with another precision; weights and Adam state stay fp32 either way.
    `report_to` (`--report-to`: none, tensorboard, wandb) is one of accelerate's trackers, writing
    under `logging_dir` (tensorboard's event files: `<output-dir>/logs/<stage>/`).
    """
    import torch
    from accelerate import Accelerator

    from pipeline.models import pick_device, training_precision

    device = pick_device(device)
    resolved = training_precision(device, precision)
    if report_to != "none":
        try:  # imported, not just found: a broken install must be this one line too, not accelerate's traceback
            importlib.import_module(TRACKER_PACKAGES[report_to])
        except ImportError:
            raise UserError(f"--report-to {report_to}: {TRACKER_PACKAGES[report_to]} is not installed "
                            f"(pip install {TRACKER_PACKAGES[report_to]}); --report-to tensorboard works offline") from None
    log_with = None if report_to == "none" else report_to
    accelerator = Accelerator(cpu=(device == "cpu"), mixed_precision="no", log_with=log_with,
                              project_dir=str(logging_dir) if logging_dir is not None else None)
    check_fsdp_applied(accelerator)
    return accelerator, resolved


def check_fsdp_applied(accelerator) -> None:
    """Refuse a launch that asked for FSDP (`accelerate launch --config_file configs/fsdp.yaml`) but got none.

    accelerate turns the FSDP config into FSDP only on GPU-like devices: on CPU it runs the very
    same launch as DDP (distributed type MULTI_CPU) without a word, so a user would believe the
    model was sharded. torch's own FSDP2 runs on CPU with gloo; accelerate does not route to it.
    """
    import os

    if os.environ.get(ACCELERATE_FSDP_ENV, "false").lower() == "true" and accelerator.distributed_type.name != "FSDP":
        raise UserError(f"FSDP (configs/fsdp.yaml): accelerate applies it only on GPUs; on {accelerator.device.type} "
                        f"this launch would silently run as {accelerator.distributed_type.name} instead; "
                        f"launch on GPUs, or drop --config_file for DDP")


ACCELERATE_FSDP_ENV = "ACCELERATE_USE_FSDP"  # what `accelerate launch` sets from a config's distributed_type: FSDP


REPORT_TO = ("none", "tensorboard", "wandb")  # --report-to's choices: accelerate's tracker names, or none
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TRACKER_DIR = "logs"  # inside --output-dir: tensorboard --logdir <output-dir>/logs


def start_trackers(accelerator, stage: str, config: dict) -> None:
    """Name the run `stage` and store its options (as the scalars trackers take: None and lists as text)."""
    if not accelerator.log_with:
        return
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    accelerator.init_trackers(stage, config=flat)


def log_to_trackers(accelerator, row: dict, step: int) -> None:
    """A metrics row's numbers (loss, lr, accuracy, ...) to every tracker; nothing without --report-to."""
    if accelerator.log_with:
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                         and k != "step"}, step=step)


@dataclass
class Trainer:
    """What every step needs. `module` is already prepared by the accelerator (DDP/FSDP-wrapped)."""

    accelerator: Any
    module: Any
    optimizer: Any
    scheduler: Any
    precision: str = "fp32"

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        import torch

        return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def to_device(self, batch: dict) -> dict:
        """The batch's tensors on this process's device; plain numbers (counts) are left out."""
        return {k: v.to(self.accelerator.device) for k, v in batch.items() if hasattr(v, "to")}

    def reduce_sum(self, *values: float) -> list[float]:
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist() if self.world > 1 else t.tolist()


def make_trainer(module, accelerator, precision: str, *, lr: float, weight_decay: float, schedule: str,
                 warmup_ratio: float, total_steps: int) -> Trainer:
    """AdamW over the trainable parameters and a warmed-up schedule, prepared for the accelerator."""
    import torch
    from transformers import get_scheduler

    params = [p for p in module.parameters() if p.requires_grad]
    # The fused kernel updates every parameter in one pass: the same AdamW, ~5x less optimizer time
    # on CPU than the default per-op path (bench/bench_sft.py's profile); transformers.Trainer's default too.
    fused = all(p.device.type in FUSED_ADAMW_DEVICES for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    return Trainer(accelerator, module, optimizer, scheduler, precision)


# ----------------------------------------------------------------------------- one step

@dataclass
class StepResult:
    loss: float  # mean per unit over the global step
    accuracy: float  # argmax hits per unit
    units: int  # what the loss was averaged over, all processes (response tokens for SFT)
    tokens: int  # real (non-padding) tokens seen, all processes


def train_step(trainer: Trainer, batches: list[dict | None], *, filler: Callable[[], dict],
               units: Callable[[dict], int], step: int) -> StepResult:
    """One optimizer step over this process's micro-batches (None: this process's share ran out).

    The loss is averaged over the units of the whole global step, so accumulating micro-batches
    (or adding processes) gives the same update as one big batch. A process whose share ran out
    still runs `filler()` with weight 0, so every process takes part in every collective. The
    update is not applied when the loss is not finite: the run stops with one line instead.
    """
    real = [b for b in batches if b is not None]
    global_units, global_tokens = trainer.reduce_sum(sum(units(b) for b in real),
                                                     sum(int(b.get("real_tokens", 0)) for b in real))
    scale = trainer.world / max(global_units, 1)  # DDP averages gradients over processes: undo it
    loss_total = correct_total = 0.0
    for j, batch in enumerate(batches):
        weight = 1.0
        if batch is None:
            batch, weight = filler(), 0.0
        sync = j == len(batches) - 1  # gradients are all-reduced once, after the last micro-batch
        with (trainer.accelerator.no_sync(trainer.module) if not sync and trainer.world > 1 else contextlib.nullcontext()):
            with trainer.autocast():
                loss_sum, correct, _ = trainer.module(**trainer.to_device(batch))
            trainer.accelerator.backward(loss_sum * (weight * scale))
        loss_total += float(loss_sum.detach()) * weight
        correct_total += float(correct) * weight
    loss_total, correct_total = trainer.reduce_sum(loss_total, correct_total)
    loss = loss_total / max(global_units, 1)
    if not math.isfinite(loss):
        raise UserError(f"training stopped at step {step}: the loss is {loss} (not finite), so the weights would "
                        f"turn to garbage; nothing of this step is saved: lower --lr or check the data")
    largest_lr = max(group["lr"] for group in trainer.optimizer.param_groups)
    if largest_lr > FLOAT32_MAX:  # the fused AdamW kernel would cast it to inf and write NaN weights silently
        raise UserError(f"training stopped at step {step}: the update does not fit in a float (learning rate "
                        f"{largest_lr:g}); nothing of this step is saved: lower --lr")
    try:
        trainer.optimizer.step()
    except RuntimeError as e:
        # torch refuses a step size beyond the float32 range (a learning rate of ~1e38 and up).
        if "overflow" not in str(e):
            raise
        raise UserError(f"training stopped at step {step}: the update does not fit in a float ({e}); "
                        f"nothing of this step is saved: lower --lr") from None
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, correct_total / max(global_units, 1), int(global_units), int(global_tokens))


def validate(trainer: Trainer, batches: Iterable[dict]) -> tuple[float | None, float | None]:
    """`(mean loss, mean correct)` per unit over this process's `batches`, summed over processes
    (for SFT: loss and token accuracy on the response tokens); `(None, None)` with no unit."""
    import torch

    trainer.module.eval()
    loss_total = correct_total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            with trainer.autocast():
                loss_sum, correct, n = trainer.module(**trainer.to_device(batch))
            loss_total += float(loss_sum)
            correct_total += float(correct)
            count += int(n)
    trainer.module.train()
    loss_total, correct_total, count = trainer.reduce_sum(loss_total, correct_total, count)
    return (loss_total / count, correct_total / count) if count else (None, None)


def check_weights_finite(trainer: Trainer, step: int) -> None:
    """Refuse to save weights holding NaN or infinity (a loss can be finite one step before they are)."""
    import torch

    bad = sum(int((~torch.isfinite(p.detach())).any()) for p in trainer.module.parameters())
    if trainer.reduce_sum(bad)[0]:
        raise UserError(f"training stopped after step {step}: the weights are no longer finite numbers "
                        f"(the learning rate is too high for this data); nothing of this step is saved")


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(output_dir: Path) -> list[Path]:
    """Whole checkpoints, oldest first: `step-<digits>` folders with their trainer state."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_NAME.fullmatch(p.name).group(1)))


def partial_checkpoints(output_dir: Path) -> list[Path]:
    """`step-N.tmp` folders: saves cut short by a kill, never read."""
    root = Path(output_dir) / CHECKPOINT_DIR
    return sorted(p for p in root.glob("step-*" + PARTIAL_SUFFIX)) if root.is_dir() else []


def claim_checkpoints(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, after refusing to mix runs; nothing is removed here.

    Without `resume`, a folder holding checkpoints belongs to another run: continuing there
    would let a later `--resume` load that run's weights. `overwrite` says the user means to
    start afresh (`clear_run` then removes them).
    """
    found = checkpoints(output_dir)
    if resume:
        if not found:
            raise UserError(f"--resume: no checkpoint in {Path(output_dir) / CHECKPOINT_DIR}")
        return found[-1]
    if found and not overwrite:
        raise UserError(f"--output-dir {output_dir}: holds checkpoints of an earlier run (last: {found[-1].name}); "
                        f"add --resume to continue it, or --overwrite to start afresh there (they are removed)")
    return None


def clear_run(output_dir: Path, names: Iterable[str]) -> None:
    """Remove an earlier run's checkpoints and the files named in `names` (main process only)."""
    shutil.rmtree(Path(output_dir) / CHECKPOINT_DIR, ignore_errors=True)
    for name in names:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    removed = partial_checkpoints(output_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def check_resume_state(checkpoint: Path, settings: dict, total_steps: int | None = None) -> dict:
    """The checkpoint's trainer state, once its settings (and total steps) match this run's."""
    import json

    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable ({e}); start afresh with --overwrite") from None
    saved = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: records no settings to check, so it cannot be resumed safely; "
                        f"start afresh with --overwrite")
    changed = [key for key in settings if saved.get(key) != settings[key]]
    if changed:
        flags = ", ".join(key if key.endswith("_sha256") else "--" + key.replace("_", "-") for key in changed)
        raise UserError(f"--resume: {flags} differ from the run in {checkpoint.parent.parent}; "
                        f"resume with the same values or use a new --output-dir")
    if total_steps is not None and state.get("total_steps") != total_steps:
        raise UserError(f"--resume: this run has {total_steps} steps, the checkpoint's run {state.get('total_steps')}; "
                        f"the data or the tokenizer changed: use a new --output-dir")
    return state


def save_checkpoint(trainer: Trainer, output_dir: Path, state: dict, lora: bool) -> Path:
    """Model weights (safetensors) or adapter, optimizer and scheduler state (tensors only), and `state`."""
    import torch

    accelerator = trainer.accelerator
    path = Path(output_dir) / CHECKPOINT_DIR / f"step-{state['step']:0{STEP_DIGITS}d}"
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    lm = accelerator.unwrap_model(trainer.module).lm
    full_state = accelerator.get_state_dict(trainer.module)  # every rank must take part under FSDP
    sharded = accelerator.distributed_type.name == "FSDP"
    if trainer.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if lora:
            lm.save_pretrained(tmp / "adapter")
        else:
            weights = {k[len("lm."):]: v for k, v in full_state.items() if k.startswith("lm.")}
            lm.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(torch.get_rng_state(), tmp / "rng.pt")
    accelerator.wait_for_everyone()
    # Under FSDP each rank holds a shard of the Adam state; under DDP they are all equal.
    if sharded or trainer.main:
        torch.save(trainer.optimizer.state_dict(), tmp / f"optimizer.{accelerator.process_index if sharded else 0}.pt")
    accelerator.wait_for_everyone()
    if trainer.main:
        write_json_atomic(tmp / TRAINER_STATE, state)  # last: a folder without it is not a checkpoint
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint_state(trainer: Trainer, path: Path) -> None:
    """Optimizer, scheduler and RNG state of a checkpoint into a trainer built the same way."""
    import torch

    sharded = trainer.accelerator.distributed_type.name == "FSDP"
    rank = trainer.accelerator.process_index if sharded else 0
    # weights_only: a checkpoint folder is data, and unpickling arbitrary objects would run code.
    trainer.optimizer.load_state_dict(torch.load(path / f"optimizer.{rank}.pt", weights_only=True, map_location="cpu"))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True))


# ----------------------------------------------------------------------------- the model in and out
# Shared by `finetune` and `dpo`: `cfg` is either stage's Config (the fields named below).

LORA_ALPHA_PER_RANK = 2  # alpha = 2r, the common choice that keeps the update scale stable across r
DIGEST_CHUNK = 1 << 20  # bytes read at a time while hashing the data file


def is_first_process() -> bool:
    """Before the Accelerator exists: rank 0 under torchrun / accelerate launch, or a plain run."""
    import os

    return os.environ.get("RANK", "0") == "0"


def file_digest(path) -> str:
    """SHA-256 of a file: a checkpoint records its data file's, so an edited file is not resumed on."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(DIGEST_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_training_tokenizer(cfg):
    """`cfg.model`'s tokenizer, refused when it has no EOS (responses could not end)."""
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.eos_token_id is None:
        raise UserError(f"--model {cfg.model}: the tokenizer has no EOS token, so responses cannot end")
    return tokenizer


def load_training_model(cfg, resume_from: Path | None):
    """`cfg.model` in fp32 (weights and Adam state stay fp32), or the checkpoint's; LoRA-wrapped with `cfg.lora`."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import ADAPTER_DIR, load_causal_lm

    if resume_from is not None and not cfg.lora:
        model = AutoModelForCausalLM.from_pretrained(resume_from, dtype=torch.float32)
    else:
        model = load_causal_lm(cfg.model, torch.float32)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_from is not None:
            return PeftModel.from_pretrained(model, resume_from / ADAPTER_DIR, is_trainable=True)
        model = get_peft_model(model, LoraConfig(r=cfg.lora, lora_alpha=LORA_ALPHA_PER_RANK * cfg.lora, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model


def save_model(trainer: Trainer, output_dir: Path, tokenizer, cfg, total_steps: int) -> None:
    """The trained model (merged too with `cfg.merge`) and the tokenizer with the chat template training used."""
    from pipeline.models import ADAPTER_DIR, portable_name
    from pipeline.templates import serving_chat_template

    check_weights_finite(trainer, total_steps)
    accelerator = trainer.accelerator
    full_state = accelerator.get_state_dict(trainer.module)  # every rank takes part under FSDP
    if not trainer.main:
        accelerator.wait_for_everyone()
        return
    lm = accelerator.unwrap_model(trainer.module).lm
    lm.config.use_cache = True  # for generation and serving
    chat_template = serving_chat_template(tokenizer, cfg.template)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if cfg.lora:
        # The base by the name the user gave (or the embedded model's), not this machine's cache path.
        lm.peft_config["default"].base_model_name_or_path = portable_name(cfg.model)
        # Embeddings are never adapted (all-linear leaves them out); saying so spares PEFT a hub
        # lookup of the base's config by that name, which offline is a DNS wait and a warning.
        lm.save_pretrained(output_dir / ADAPTER_DIR, save_embedding_layers=False)
        tokenizer.save_pretrained(output_dir / ADAPTER_DIR)
        if cfg.merge:
            lm.merge_and_unload().save_pretrained(output_dir, safe_serialization=True)
    else:
        weights = {k[len("lm."):]: v for k, v in full_state.items() if k.startswith("lm.")}
        lm.save_pretrained(output_dir, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------- a run's start, resume and checkpoints
# The steps finetune and dpo take in the same way around their own data and loss.


def open_run(cfg, output_dir: Path, resume_from: Path | None, settings: dict, stage: str, earlier_run_files):
    """(accelerator, precision) for a run in `output_dir`, its folder made ready on the main process.

    A resumed run's settings are checked first, before any model loads, so a mismatch fails fast;
    `--overwrite` clears an earlier run's files; half-written checkpoints are removed."""
    from accelerate.utils import set_seed

    from pipeline.config import to_dict

    if resume_from is not None:
        check_resume_state(resume_from, settings)
    accelerator, precision = make_accelerator(cfg.device, cfg.precision, cfg.report_to, output_dir / TRACKER_DIR)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        if cfg.overwrite:
            clear_run(output_dir, earlier_run_files)
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(output_dir)
    accelerator.wait_for_everyone()
    start_trackers(accelerator, stage, to_dict(cfg))
    return accelerator, precision


def restore_run(trainer, resume_from: Path | None, settings: dict, total_steps: int) -> tuple[int, int]:
    """(step, trained tokens) to start from: 0 for a new run, the checkpoint's with `--resume`."""
    if resume_from is None:
        return 0, 0
    load_checkpoint_state(trainer, resume_from)
    state = check_resume_state(resume_from, settings, total_steps)
    if trainer.main:
        print(f"resuming from {resume_from} at step {state['step']}", flush=True)
    return state["step"], state["trained_tokens"]


def checkpoint_if_due(trainer, cfg, output_dir: Path, step: int, trained_tokens: int, total_steps: int,
                      settings: dict) -> None:
    """Every `--save-every` steps but the last (the final save follows it), finite weights only."""
    if not cfg.save_every or step % cfg.save_every or step == total_steps:
        return
    check_weights_finite(trainer, step)
    save_checkpoint(trainer, output_dir, {"step": step, "trained_tokens": trained_tokens,
                                          "total_steps": total_steps, "settings": settings}, bool(cfg.lora))


# ---------------------------------------------------------------- the flags every training stage shares
AUTO_TEMPLATE = "auto"  # --template auto: each stage's own rule picks alpaca or chat


@dataclass(frozen=True)
class RunOptions:
    """Where and how a training run runs, the same for finetune and dpo (each adds its own data,
    objective and schedule fields). Checkpoints, resume and trackers are `training`'s, so are these."""

    save_every: int = option(200, "checkpoint every this many steps (0: none)", min=0)
    resume: bool = option(False, "continue from the last checkpoint in --output-dir with its optimizer state")
    overwrite: bool = option(False, "start afresh in an --output-dir holding an earlier run's checkpoints (they are removed)")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 autocast or fp32; auto: bf16 on a GPU that has it "
                                                                "and on a CPU with bf16 matmul units (AVX-512 BF16, AMX), else fp32")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% more compute")
    device: str = option("auto", "cuda, cpu, mps or auto (under torchrun/accelerate the launcher decides)")
    report_to: Literal["none", "tensorboard", "wandb"] = option("none", "also log the metrics to this tracker (accelerate's); "
                                                                f"tensorboard's events go to <output-dir>/{TRACKER_DIR}/")


def check_run_flags(cfg) -> None:
    """The rules between flags that every training stage has (bounds are checked by `config.validate`)."""
    from pipeline.templates import TEMPLATES

    if cfg.template != AUTO_TEMPLATE and cfg.template not in TEMPLATES:
        raise UserError(f"--template: {cfg.template!r} is not one of {', '.join(TEMPLATES)}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise UserError(f"--max-steps: must be -1 (no limit) or positive, got {cfg.max_steps}")
    if cfg.merge and not cfg.lora:
        raise UserError("--merge: only with --lora R (full fine-tuning already saves a whole model)")
    if cfg.resume and cfg.overwrite:
        raise UserError("--overwrite: not with --resume (one continues the earlier run, the other removes it)")


def claim_run_dir(cfg, output_dir: Path, run_files) -> Path | None:
    """Check and lock a run's output folder before the model loads; the checkpoint to resume, if any.

    The folder's lock, and the files the run writes into it: none may be the training data. One
    lock per run: under DDP only the first process takes it (the others would be refused)."""
    from pipeline.outputs import check_output_folder, check_outputs_apart, claim_outputs

    check_output_folder(output_dir, "--output-dir")
    if is_first_process():
        claim_outputs({"--data": cfg.data}, {"--output-dir": output_dir})
    check_outputs_apart({"--data": cfg.data}, {"--output-dir": [output_dir / name for name in run_files]})
    return claim_checkpoints(output_dir, cfg.resume, cfg.overwrite)


def resumed_history(metrics_path: Path, resume_from: Path | None, start_step: int) -> list[dict]:
    """metrics.jsonl cut back to the step a run resumes from (a fresh run starts it empty); its records."""
    from pipeline.jsonl import read_records, write_jsonl_atomic

    old = [r for _, r in read_records(metrics_path)] if resume_from is not None and metrics_path.exists() else []
    history = [r for r in old if r.get("step", 0) <= start_step]
    write_jsonl_atomic(metrics_path, history)
    return history
