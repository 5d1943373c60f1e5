"""Supervised fine-tuning with cross-entropy on the response tokens only.

    python -m pipeline finetune --data data/alpaca_data.jsonl --model SmolLM2-135M-Instruct --output-dir runs/sft
    torchrun --nproc_per_node 4 -m pipeline finetune ...                  # DDP
    accelerate launch -m pipeline finetune ...                            # DDP, or FSDP:
    accelerate launch --config_file configs/fsdp.yaml -m pipeline finetune ...

Records are Alpaca JSONL (instruction, optional input, output) or chat `messages` (what a
training record is: `pipeline.records`); the prompt is built by `pipeline.templates`
(`--template alpaca|chat`) and masked with -100, so loss and token accuracy count only the
response and its EOS. Defaults follow Stanford Alpaca (lr 2e-5, 3 epochs, cosine, warmup 3%,
max length 512, no weight decay), with a batch of 8 rather than 128 because the generated data
sets here are hundreds to thousands of records, not 52k: a batch of 128 would leave a few
dozen optimizer steps.

Why our own loop (on `accelerate.Accelerator`) and not `transformers.Trainer`: the speed of
small-model SFT on modest hardware comes from three things Trainer does not do out of the
box: (1) the LM head and cross-entropy run only on response positions (for a 135M model the
49k-vocabulary head over every position is a large share of the FLOPs and memory); (2) packing
with records isolated by per-record `position_ids` (transformers' attention then builds a
block-diagonal mask, or varlen kernels for flash attention) with a self-check at start that the
kernel really honours them, falling back to an explicit block-diagonal 4-D mask; (3) batches
sized by length without padding to max length. Each of these would be a Trainer override
(compute_loss, collator, sampler). `Accelerator` gives DDP and FSDP (via `accelerate launch`
or `torchrun`) from the same code; bf16 is torch autocast.

`run` reads top to bottom: load and check the records, claim the output folder (a folder
holding another run's checkpoints is refused unless `--resume` or `--overwrite`), `prepare`
(accelerator, tokenizer, data, model, optimizer), restore a checkpoint, `train` (each step is
`pipeline.training.train_step`, validation `pipeline.training.validate`), `save_final`. The
loss-independent parts live in `pipeline.training` so a preference stage reuses them.

Validation (`--val-fraction`) holds out whole tasks by default (`pipeline.task_split`: records
sharing an instruction, or a seed's task id, fall on one side), so validation loss is measured
on tasks training never saw; `--val-split records` draws random records instead. Every
`--eval-every` steps `metrics.jsonl` gets `val_loss` and `val_token_accuracy`, and with
`--eval-generate K` the ROUGE-L and exact match of greedy answers to K validation records.

Outputs in `--output-dir`: the model and tokenizer (safetensors; the tokenizer's
`chat_template` renders a user turn into the very prompt training used, so a served model is
prompted as it was trained), `train_config.json` (`pipeline.records.TRAIN_CONFIG`, which eval
reads), `metrics.jsonl`, `val.jsonl` (held-out records as read), `loss.png`, and
`checkpoints/step-N/` every `--save-every` steps, from which `--resume` continues. With
`--lora` the adapter goes to `adapter/` and names its base portably (`models.portable_name`),
so `eval --model <output-dir>` loads it on its base.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.batching import collate, encode_all, micro_batch_filler, packing_honoured, plan_batches, split_records
from pipeline.cards import CARD_FILE, write_model_card
from pipeline.config import option, to_dict, validate
from pipeline.errors import UserError
from pipeline.jsonl import (AppendLog, locked_outputs, read_records, write_json_atomic, write_jsonl_atomic)
from pipeline.models import ADAPTER_DIR
from pipeline.packed_attention import use_packed_attention
from pipeline.plots import plot_loss
from pipeline.records import TRAIN_CONFIG, training_record_validator
from pipeline.task_split import split_by_task
from pipeline.templates import IGNORE_INDEX, EncodedExample
from pipeline.training import (AUTO_TEMPLATE, resumed_history, claim_run_dir, RunOptions, Trainer, check_run_flags, checkpoint_if_due,
                               open_run, restore_run, check_resume_state, file_digest, load_training_model,
                               load_training_tokenizer, make_trainer, save_model, TRACKER_DIR, log_to_trackers,
                               train_step, validate as validation_loss)

METRICS_FILE = "metrics.jsonl"
VAL_FILE = "val.jsonl"
LOSS_PLOT = "loss.png"
# Files a run writes at the top of --output-dir (besides the model's own).
RUN_FILES = (VAL_FILE, METRICS_FILE, TRAIN_CONFIG, "config.json", LOSS_PLOT, CARD_FILE, TRACKER_DIR)
# What `--overwrite` removes besides the checkpoints: an earlier run's outputs, which a new run
# might not rewrite (an adapter when the new run is full fine-tuning, a sharded model's parts).
EARLIER_RUN_FILES = RUN_FILES + (ADAPTER_DIR, "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
                                 "adapter_model.safetensors")
# Fields that must match between a run and the checkpoint it resumes: anything that changes
# the data order, the batch contents or the set of trained parameters. The data file's digest
# is checked too, so an edited file with the same name is not mixed into the old run.
RESUME_MUST_MATCH = ("data", "model", "template", "max_length", "batch_size", "grad_accum", "packing",
                     "lora", "val_fraction", "val_split", "seed", "epochs", "max_steps")

# --eval-generate's answer length: the demo's references are mostly under 100 tokens, and a
# longer cap would make each validation point cost more than the steps between them.
EVAL_GENERATE_MAX_NEW_TOKENS = 128

# `--template auto` picks chat for files holding conversations (what `convert --kind dialogue`
# and `mix` write), since only the chat template can express several turns.



@dataclass(frozen=True)
class Config(RunOptions):
    data: str = option("data/alpaca_data.jsonl", "training records (Alpaca JSONL, or chat `messages` JSONL with --template chat)")
    output_dir: str = option("runs/sft", "where the model, metrics and plots go")
    model: str = option("SmolLM2-135M-Instruct", "base model: the embedded SmolLM2-135M-Instruct or a local Hugging Face folder")
    template: Literal["auto", "alpaca", "chat"] = option("auto", "prompt template: Stanford Alpaca's, or the tokenizer's chat "
                                                         "template; auto: chat when any record is a `messages` conversation, else alpaca")
    epochs: int = option(3, "passes over the training records (Alpaca: 3)", min=1)
    max_steps: int = option(-1, "stop after this many optimizer steps (-1: run all epochs)")
    lr: float = option(2e-5, "peak learning rate (Alpaca: 2e-5 for full fine-tuning; LoRA wants ~1e-4..1e-3)", above=0)
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("cosine", "learning rate schedule after warmup")
    warmup_ratio: float = option(0.03, "share of the steps spent warming the learning rate up from 0", min=0, below=1)
    weight_decay: float = option(0.0, "AdamW weight decay (Alpaca: 0)", min=0)
    batch_size: int = option(8, "rows per device per micro-batch (with --packing a row holds several records)", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step; global batch = batch size x grad accum x processes", min=1)
    max_length: int = option(512, "tokens per record (longer ones are cut) and per packed row", min=1)
    packing: bool = option(False, "pack several records per row, each attending only to itself")
    lora: int = option(0, "LoRA rank: train low-rank adapters only (0: full fine-tuning)", min=0)
    merge: bool = option(False, "with --lora: also save the adapter merged into the base model")
    val_fraction: float = option(0.05, "share of records held out for validation loss (written to val.jsonl)", min=0, below=1)
    val_split: Literal["tasks", "records"] = option("tasks", "hold out whole tasks (records sharing an instruction, or a "
                                                    "seed's task id, stay on one side), or random records")
    eval_every: int = option(50, "validation loss and token accuracy every this many steps (and at the end; 0: only at the end)",
                             min=0)
    eval_generate: int = option(0, "at each validation, also greedy answers to the first K validation records: their "
                                   "ROUGE-L and exact match go to metrics.jsonl (one process only)", min=0)
    seed: int = option(42, "seed for the split, the data order and initialisation of adapters")

    def __post_init__(self):
        validate(self)
        check_run_flags(self)


@dataclass
class Stats:
    records: int = 0
    train_records: int = 0
    val_records: int = 0
    truncated: int = 0
    dropped: int = 0
    steps: int = 0
    trained_tokens: int = 0
    final_loss: float = float("nan")
    final_val_loss: float | None = None
    seconds: float = 0.0
    output_dir: str = ""
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- data

def load_training_records(path, template: str) -> list[dict]:
    """Every record, checked by the one definition of a training record (`pipeline.records`)."""
    validate_record = training_record_validator(path, None if template == AUTO_TEMPLATE else template)
    records = [r for _, r in read_records(path, validate=validate_record)]
    if not records:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def resolve_template(cfg: Config, records: list[dict]) -> Config:
    """`--template auto` made concrete, so train_config.json (which eval reads) names the template used."""
    if cfg.template != AUTO_TEMPLATE:
        return cfg
    return dataclasses.replace(cfg, template="chat" if any("messages" in r for r in records) else "alpaca")


def resume_settings(cfg: Config) -> dict:
    """What a checkpoint records and a resume must match: the flags and the data file's content."""
    now = to_dict(cfg)
    return {**{key: now[key] for key in RESUME_MUST_MATCH}, "data_sha256": file_digest(cfg.data)}


def trained_tokens(batch: dict) -> int:
    """The units SFT averages its loss over: labelled positions (a label at t is predicted at t-1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class TrainData:
    """The records split and tokenized; `dropped` examples (response cut away) are kept for the report only."""

    records: list[dict]
    train_records: list[dict]
    val_records: list[dict]
    train_all: list[EncodedExample]
    val_all: list[EncodedExample]

    @property
    def train_examples(self) -> list[EncodedExample]:
        return [e for e in self.train_all if not e.dropped]

    @property
    def val_examples(self) -> list[EncodedExample]:
        return [e for e in self.val_all if not e.dropped]


def prepare_data(cfg: Config, records: list[dict], tokenizer) -> TrainData:
    split = split_by_task if cfg.val_split == "tasks" else split_records  # pipeline.task_split says why
    train_records, val_records = split(records, cfg.val_fraction, cfg.seed)
    data = TrainData(records, train_records, val_records, encode_all(train_records, tokenizer, cfg.template, cfg.max_length),
                     encode_all(val_records, tokenizer, cfg.template, cfg.max_length))
    if not data.train_examples:
        raise UserError(f"{cfg.data}: every record's response is cut away at --max-length {cfg.max_length}")
    return data


@dataclass
class SftBatches:
    """This process's micro-batches for each global step, and its share of the validation batches."""

    cfg: Config
    train: list[EncodedExample]
    val: list[EncodedExample]
    pad_id: int
    block_mask: bool
    world: int
    rank: int
    _plan: tuple[int, list] = (-1, [])  # (epoch, its plan): every step of an epoch reads the same one

    def __post_init__(self):
        self.per_step = self.cfg.grad_accum * self.world  # micro-batches per optimizer step
        self.steps_per_epoch = math.ceil(len(self.epoch_plan(0)) / self.per_step)

    def epoch_plan(self, epoch: int) -> list:
        if self._plan[0] != epoch:
            cfg = self.cfg
            self._plan = (epoch, plan_batches(self.train, cfg.batch_size, cfg.packing, cfg.max_length, cfg.seed, epoch))
        return self._plan[1]

    def total_steps(self) -> int:
        return self.cfg.max_steps if self.cfg.max_steps > 0 else self.steps_per_epoch * self.cfg.epochs

    def micro_batches(self, step: int) -> list[dict | None]:
        """This rank's micro-batches for global step `step` (None where the epoch ran out)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        plan = self.epoch_plan(epoch)
        picked = []
        for j in range(self.cfg.grad_accum):
            i = offset * self.per_step + j * self.world + self.rank
            picked.append(collate(plan[i], self.train, self.pad_id, self.block_mask) if i < len(plan) else None)
        return picked

    def filler(self) -> dict:
        """A one-row batch (the shortest example), run with weight 0 by a rank whose share ran out."""
        return collate(micro_batch_filler(self.train), self.train, self.pad_id, self.block_mask)

    def validation(self):
        cfg = self.cfg
        plan = plan_batches(self.val, cfg.batch_size, cfg.packing, cfg.max_length, cfg.seed, 0)
        return (collate(rows, self.val, self.pad_id, self.block_mask) for rows in plan[self.rank::self.world])


# ----------------------------------------------------------------------------- model

def make_loss_module(model):
    """Wrap a causal LM so forward returns the summed response-token loss, correct count and count.

    Only positions whose next-token label is not IGNORE_INDEX go through the LM head and
    cross-entropy. It is an nn.Module so DDP/FSDP wrap it and their hooks see the forward.
    """
    import torch
    import torch.nn.functional as F

    class ResponseLoss(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def base(self):
            return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

        def forward(self, input_ids, labels, position_ids, attention_mask=None):
            base = self.base()
            hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                        attention_mask=attention_mask, use_cache=False).last_hidden_state
            # Position t predicts token t+1: shift the labels, keep only trained positions.
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            picked = hidden[:, :-1][keep]
            logits = base.get_output_embeddings()(picked).float()
            gold = targets[keep]
            loss_sum = F.cross_entropy(logits, gold, reduction="sum")
            correct = (logits.argmax(-1) == gold).sum()
            return loss_sum, correct, gold.numel()

    return ResponseLoss(model)


# ----------------------------------------------------------------------------- run

@dataclass
class Session:
    """Everything `train` and `save_final` need, made by `prepare`."""

    cfg: Config
    output_dir: Path
    trainer: Trainer
    tokenizer: object
    data: TrainData
    batches: SftBatches
    total_steps: int
    packing_mode: str
    resume_from: Path | None = None
    settings: dict = field(default_factory=dict)


def claim_output_dir(cfg: Config, output_dir: Path) -> Path | None:
    """Check and lock the output folder before the model loads; the checkpoint to resume, if any."""
    return claim_run_dir(cfg, output_dir, RUN_FILES)


def prepare(cfg: Config, records: list[dict], output_dir: Path, resume_from: Path | None) -> Session:
    """Accelerator, tokenizer, data, model and optimizer, ready for step 0 (or the resumed step)."""
    settings = resume_settings(cfg)
    accelerator, precision = open_run(cfg, output_dir, resume_from, settings, "finetune", EARLIER_RUN_FILES)
    tokenizer = load_training_tokenizer(cfg)
    data = prepare_data(cfg, records, tokenizer)
    model = load_training_model(cfg, resume_from).to(accelerator.device)
    if accelerator.device.type == "cpu":
        # One SDPA call per record, no row-wide mask, and fp32 scores under bf16 autocast (unpacked
        # rows too, each one record): pipeline.packed_attention.
        use_packed_attention(model)
    block_mask = bool(cfg.packing) and not packing_honoured(model, accelerator.device)
    batches = SftBatches(cfg, data.train_examples, data.val_examples, tokenizer.pad_token_id, block_mask,
                         accelerator.num_processes, accelerator.process_index)
    total_steps = batches.total_steps()
    if resume_from is not None:
        check_resume_state(resume_from, settings, total_steps)
    trainer = make_trainer(make_loss_module(model), accelerator, precision, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           schedule=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio, total_steps=total_steps)
    packing_mode = "explicit block-diagonal 4-D mask" if block_mask else "per-record position_ids"
    return Session(cfg, output_dir, trainer, tokenizer, data, batches, total_steps, packing_mode, resume_from, settings)


def start_outputs(s: Session, start_step: int) -> list[dict]:
    """metrics.jsonl cut back to the resumed step, val.jsonl, train_config.json; the history so far."""
    if not s.trainer.main:
        return []
    history = resumed_history(s.output_dir / METRICS_FILE, s.resume_from, start_step)
    write_jsonl_atomic(s.output_dir / VAL_FILE, s.data.val_records)
    accelerator = s.trainer.accelerator
    from pipeline.models import portable_name, resolve_model
    from pipeline.provenance import provenance

    write_json_atomic(s.output_dir / TRAIN_CONFIG, {
        "stage": "finetune", "config": to_dict(s.cfg), "base_model": portable_name(s.cfg.model),
        "base_model_path": str(resolve_model(s.cfg.model)), "device": str(accelerator.device),
        "precision": s.trainer.precision, "processes": s.trainer.world, "distributed": accelerator.distributed_type.name,
        "packing_mode": s.packing_mode if s.cfg.packing else None, "steps_per_epoch": s.batches.steps_per_epoch,
        "total_steps": s.total_steps, "train_records": len(s.data.train_records), "val_records": len(s.data.val_records),
        "provenance": provenance()})
    return history


def train(s: Session, start_step: int, trained_total: int, history: list[dict]) -> tuple[dict, int]:
    """Steps `start_step`..end: log each, validate and checkpoint on schedule; the last row and tokens trained."""
    from tqdm import tqdm

    cfg, trainer = s.cfg, s.trainer
    if cfg.eval_generate and trainer.world > 1:  # generating on one rank would deadlock FSDP's sharded weights
        raise UserError(f"--eval-generate: needs a single process (this run has {trainer.world}); drop it under DDP/FSDP")
    log = AppendLog(s.output_dir / METRICS_FILE) if trainer.main else None
    bar = tqdm(total=s.total_steps, initial=start_step, desc="training", unit="step", disable=not trainer.main, file=sys.stderr)
    trainer.module.train()
    last: dict = {}
    try:
        for step in range(start_step, s.total_steps):
            started = time.time()
            done = train_step(trainer, s.batches.micro_batches(step), filler=s.batches.filler, units=trained_tokens,
                              step=step + 1)
            elapsed = max(time.time() - started, 1e-9)  # validation and saving are not training throughput
            trained_total += done.units
            last = {"step": step + 1, "epoch": round((step + 1) / s.batches.steps_per_epoch, 4), "loss": done.loss,
                    "lr": trainer.scheduler.get_last_lr()[0], "token_accuracy": done.accuracy,
                    "tokens_per_s": done.tokens / elapsed, "trained_tokens_per_s": done.units / elapsed,
                    "trained_tokens": done.units}
            is_last = step + 1 == s.total_steps
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or is_last:
                val_loss, val_accuracy = validation_loss(trainer, s.batches.validation()) if s.data.val_examples else (None, None)
                if val_loss is not None:
                    last.update(val_loss=val_loss, val_token_accuracy=val_accuracy)
                if cfg.eval_generate:
                    last.update(generated_validation(s))
            if log is not None:
                log.write(last)
                log_to_trackers(trainer.accelerator, last, step + 1)
                history.append(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['token_accuracy']:.2f}")
                bar.update(1)
            checkpoint_if_due(trainer, cfg, s.output_dir, step + 1, trained_total, s.total_steps, s.settings)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return last, trained_total


def generated_validation(s: Session) -> dict[str, float]:
    """`val_rouge_l` and `val_exact_match` of greedy answers to the first --eval-generate validation
    records (the measures of `pipeline.metrics`, generated as `eval` does by `pipeline.greedy`)."""
    from pipeline import metrics as M
    from pipeline.greedy import generate_answers

    records = [r for r, e in zip(s.data.val_records, s.data.val_all) if not e.dropped][: s.cfg.eval_generate]
    if not records:
        return {}
    model = s.trainer.accelerator.unwrap_model(s.trainer.module).lm
    model.eval()
    try:
        answers, _, _ = generate_answers(model, s.tokenizer, records, s.cfg.template, EVAL_GENERATE_MAX_NEW_TOKENS,
                                         s.cfg.batch_size, "validation")
    finally:
        model.train()
    references = [r["output"] if "output" in r else r["messages"][-1]["content"] for r in records]
    return {"val_rouge_l": M.mean_rouge_l(answers, references), "val_exact_match": M.match_rate(answers, references),
            "val_generated": len(records)}


def save_final(s: Session) -> None:
    """The model (merged too with --merge) and the tokenizer with the chat template training used."""
    save_model(s.trainer, s.output_dir, s.tokenizer, s.cfg, s.total_steps)


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    """Train; returns Stats. `client` is unused (stages share one signature)."""
    started = time.time()
    records = load_training_records(cfg.data, cfg.template)
    cfg = resolve_template(cfg, records)
    output_dir = Path(cfg.output_dir)
    resume_from = claim_output_dir(cfg, output_dir)
    s = prepare(cfg, records, output_dir, resume_from)
    if s.trainer.main:
        print(preflight(s), flush=True)
    start_step, trained_total = restore_run(s.trainer, s.resume_from, s.settings, s.total_steps)
    history = start_outputs(s, start_step)
    last, trained_total = train(s, start_step, trained_total, history)
    save_final(s)
    data = s.data
    stats = Stats(records=len(records), train_records=len(data.train_records), val_records=len(data.val_records),
                  truncated=sum(e.truncated for e in data.train_all), dropped=sum(e.dropped for e in data.train_all),
                  steps=s.total_steps, trained_tokens=trained_total, final_loss=last.get("loss", float("nan")),
                  final_val_loss=last.get("val_loss"), seconds=time.time() - started, output_dir=str(output_dir),
                  history=history)
    if s.trainer.main:
        plot_loss(history, output_dir / LOSS_PLOT)
        write_model_card(output_dir, stage="finetune", model=cfg.model, data_files=[cfg.data], records=records,
                         hyperparameters=to_dict(cfg), tags=["sft", *(["lora"] if cfg.lora else [])])
        print_summary(stats, history)
    s.trainer.accelerator.wait_for_everyone()
    s.trainer.accelerator.end_training()
    return stats


def preflight(s: Session) -> str:
    from pipeline.token_budget import cuts_by_language, describe as describe_cuts, record_language

    cfg, examples = s.cfg, s.data.train_all
    n = len(examples)
    truncated = sum(e.truncated for e in examples)
    dropped = sum(e.dropped for e in examples)
    kept = [e for e in examples if not e.dropped]
    tokens = sum(len(e.input_ids) for e in kept)
    trained = sum(e.num_trained_tokens for e in kept)
    longest = max((e.full_length for e in examples), default=0)
    return "\n".join([
        f"pre-flight: {len(s.data.records):,} records: {n:,} train, {len(s.data.val_records):,} validation",
        f"  tokens (train, after truncation): {tokens:,}, of which trained (response + EOS): {trained:,} ({trained / max(tokens, 1):.0%})",
        f"  truncated at {cfg.max_length}: {truncated:,} ({truncated / max(n, 1):.1%}); "
        f"dropped (response cut away entirely): {dropped:,} ({dropped / max(n, 1):.1%})",
        # One limit cuts Japanese (~1.7 tokens a character in SmolLM2) far more often than English.
        f"  cut at --max-length {cfg.max_length}, per language: "
        f"{describe_cuts(cuts_by_language(examples, [record_language(r) for r in s.data.train_records]))}",
        f"  longest record: {longest:,} tokens",
        f"  batch: {cfg.batch_size} rows x {cfg.grad_accum} accumulation x {s.trainer.world} process(es)"
        + (f", packed ({s.packing_mode})" if cfg.packing else ", length-grouped"),
        f"  steps per epoch: {s.batches.steps_per_epoch:,}; total steps: {s.total_steps:,}",
    ])


def print_summary(stats: Stats, history: list[dict]) -> None:
    measured = [h for h in history[1:]] or history  # the first step includes warm-up
    tps = sum(h["trained_tokens_per_s"] for h in measured) / max(len(measured), 1)
    val = f", validation loss {stats.final_val_loss:.4f}" if stats.final_val_loss is not None else ""
    first = history[0]["loss"] if history else float("nan")
    print(f"finetune: {stats.steps} steps on {stats.train_records:,} records ({stats.dropped} dropped, "
            f"{stats.truncated} truncated), {stats.trained_tokens:,} trained tokens, "
            f"loss {first:.4f} -> {stats.final_loss:.4f}{val}, ~{tps:,.0f} trained tokens/s, "
            f"{stats.seconds:.0f} s; model in {stats.output_dir}", flush=True)
