"""Supervised fine-tuning with cross-entropy on the response tokens only.

    python -m pipeline finetune --data data/alpaca_data.jsonl --model SmolLM2-135M-Instruct --output-dir runs/sft
    torchrun --nproc_per_node 4 -m pipeline finetune ...                  # DDP
    accelerate launch -m pipeline finetune ...                            # DDP, or FSDP:
    accelerate launch --config_file configs/fsdp.yaml -m pipeline finetune ...

Records are Alpaca JSONL (instruction, optional input, output) or chat `messages`; the prompt
is built by `pipeline.templates` (`--template alpaca|chat`) and masked with -100, so loss and
token accuracy count only the response and its EOS. Defaults follow Stanford Alpaca (lr 2e-5,
3 epochs, cosine, warmup 3%, max length 512, no weight decay), with a batch of 8 rather than
128 because the generated data sets here are hundreds to thousands of records, not 52k: a
batch of 128 would leave a few dozen optimizer steps.

Why our own loop (on `accelerate.Accelerator`) and not `transformers.Trainer`: the speed of
small-model SFT on modest hardware comes from three things Trainer does not do out of the
box: (1) the LM head and cross-entropy run only on response positions (for a 135M model the
49k-vocabulary head over every position is a large share of the FLOPs and memory); (2) packing
with records isolated by per-record `position_ids` (transformers' attention then builds a
block-diagonal mask, or varlen kernels for flash attention) with a self-check at start that the
kernel really honours them, falling back to an explicit block-diagonal 4-D mask; (3) batches
sized by length without padding to max length. Each of these would be a Trainer override
(compute_loss, collator, sampler), and the loop itself is ~100 lines. `Accelerator` gives DDP
and FSDP (via `accelerate launch` or `torchrun`) from the same code; bf16 is torch autocast.

Outputs in `--output-dir`: the model and tokenizer (safetensors), `train_config.json`,
`metrics.jsonl`, `val.jsonl` (held-out records as read), `loss.png`, and
`checkpoints/step-N/` every `--save-every` steps, from which `--resume` continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import option, to_dict
from pipeline.errors import UserError
from pipeline.jsonl import AppendLog, check_output_folder, read_records, write_json_atomic, write_jsonl_atomic
from pipeline.templates import IGNORE_INDEX, TEMPLATES, EncodedExample, encode_example

# Length-grouped batching sorts records by length inside windows of this many batches, so a
# batch holds similar lengths (little padding) while the order still varies between epochs.
LENGTH_GROUP_BATCHES = 64
# Packing self-check: two probe records of these lengths must give the same hidden states
# packed in one row as run alone, else the kernel ignores position_ids for isolation.
PROBE_LENGTHS = (7, 5)
PROBE_TOLERANCE = 1e-3  # fp32 differences from summation order are ~1e-6; leakage is ~1e-1
KEEP_CHECKPOINTS = 2  # older ones are removed: each is the model plus 2x its size in Adam state
LORA_ALPHA_PER_RANK = 2  # alpha = 2r, the common choice that keeps the update scale stable across r
CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
# Fields that must match between a run and the checkpoint it resumes: anything that changes
# the data order, the batch contents or the set of trained parameters.
RESUME_MUST_MATCH = ("data", "model", "template", "max_length", "batch_size", "grad_accum", "packing",
                     "lora", "val_fraction", "seed", "epochs", "max_steps")


# `--template auto` picks chat for files holding conversations (what `convert --kind dialogue`
# and `mix` write), since only the chat template can express several turns.
AUTO_TEMPLATE = "auto"


@dataclass(frozen=True)
class Config:
    data: str = option("data/alpaca_data.jsonl", "training records (Alpaca JSONL, or chat `messages` JSONL with --template chat)")
    output_dir: str = option("runs/sft", "where the model, metrics and plots go")
    model: str = option("SmolLM2-135M-Instruct", "base model: the embedded SmolLM2-135M-Instruct or a local Hugging Face folder")
    template: Literal["auto", "alpaca", "chat"] = option("auto", "prompt template: Stanford Alpaca's, or the tokenizer's chat "
                                                         "template; auto: chat when any record is a `messages` conversation, else alpaca")
    epochs: int = option(3, "passes over the training records (Alpaca: 3)")
    max_steps: int = option(-1, "stop after this many optimizer steps (-1: run all epochs)")
    lr: float = option(2e-5, "peak learning rate (Alpaca: 2e-5 for full fine-tuning; LoRA wants ~1e-4..1e-3)")
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("cosine", "learning rate schedule after warmup")
    warmup_ratio: float = option(0.03, "share of the steps spent warming the learning rate up from 0")
    weight_decay: float = option(0.0, "AdamW weight decay (Alpaca: 0)")
    batch_size: int = option(8, "rows per device per micro-batch (with --packing a row holds several records)")
    grad_accum: int = option(1, "micro-batches per optimizer step; global batch = batch size x grad accum x processes")
    max_length: int = option(512, "tokens per record (longer ones are cut) and per packed row")
    packing: bool = option(False, "pack several records per row, each attending only to itself")
    lora: int = option(0, "LoRA rank: train low-rank adapters only (0: full fine-tuning)")
    merge: bool = option(False, "with --lora: also save the adapter merged into the base model")
    val_fraction: float = option(0.05, "share of records held out for validation loss (written to val.jsonl)")
    eval_every: int = option(50, "validation loss every this many steps (and at the end; 0: only at the end)")
    save_every: int = option(200, "checkpoint every this many steps (0: none)")
    resume: bool = option(False, "continue from the last checkpoint in --output-dir with its optimizer state")
    seed: int = option(42, "seed for the split, the data order and initialisation of adapters")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 autocast or fp32; auto: bf16 on a GPU that has it, fp32 on CPU")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% more compute")
    device: str = option("auto", "cuda, cpu, mps or auto (under torchrun/accelerate the launcher decides)")

    def __post_init__(self):
        if self.template != AUTO_TEMPLATE and self.template not in TEMPLATES:
            raise UserError(f"--template: {self.template!r} is not one of {', '.join(TEMPLATES)}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"--max-steps: must be -1 (no limit) or positive, got {self.max_steps}")
        if not self.lr > 0:
            raise UserError(f"--lr: must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup-ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay: must be >= 0, got {self.weight_decay}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction: must be in [0, 1), got {self.val_fraction}")
        if self.lora < 0:
            raise UserError(f"--lora: a rank must be >= 0, got {self.lora}")
        if self.merge and not self.lora:
            raise UserError("--merge: only with --lora R (full fine-tuning already saves a whole model)")
        if self.eval_every < 0 or self.save_every < 0:
            raise UserError("--eval-every / --save-every: must be >= 0")


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

def check_record(record: dict, line: int, path, template: str) -> None:
    from pipeline.errors import InputError

    if "messages" in record:
        messages = record["messages"]
        if template not in ("chat", AUTO_TEMPLATE):
            raise InputError(path, line, "messages", "chat records need --template chat")
        if not isinstance(messages, list) or not messages:
            raise InputError(path, line, "messages", "expected a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError(path, line, f"messages[{i}]", "expected {\"role\": str, \"content\": str}")
        if not any(m["role"] == "assistant" for m in messages):
            raise InputError(path, line, "messages", "no assistant turn to train on")
        return
    for name, required in (("instruction", True), ("input", False), ("output", True)):
        value = record.get(name)
        if value is None:
            if required:
                raise InputError(path, line, name, "missing")
        elif not isinstance(value, str):
            raise InputError(path, line, name, f"expected a string, got {json.dumps(value)[:60]}")
    if not record["instruction"].strip():
        raise InputError(path, line, "instruction", "empty")


def load_training_records(path, template: str) -> list[dict]:
    records = [r for _, r in read_records(path, validate=lambda r, line: check_record(r, line, path, template))]
    if not records:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random hold-out; at least one validation record when a fraction is asked and there are two."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(records) - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [records[i] for i in train], [records[i] for i in val]


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of examples grouped into rows of at most max_length tokens.

    Hand-written rather than a library call because the rows must respect record boundaries
    (no record split across rows) and the data is small enough that O(n log n) plus a scan of
    open rows is instant; TRL's BFD packer lives inside its trainer, not as a public function.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


def plan_batches(examples: list[EncodedExample], batch_size: int, packing: bool, max_length: int,
                 seed: int, epoch: int) -> list[list[list[int]]]:
    """One epoch's micro-batches: each a list of rows, each row a list of example indices.

    Without packing every row is one example and batches are grouped by length (sorted inside
    windows of LENGTH_GROUP_BATCHES batches, then the batches shuffled), so padding is small.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    lengths = [len(e.input_ids) for e in examples]
    if packing:
        rows = pack_rows(lengths, max_length)
        rng.shuffle(rows)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [[[i] for i in chunk[j:j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[list[int]], examples: list[EncodedExample], pad_id: int, block_mask: bool = False):
    """Tensors for one micro-batch, padded to its longest row (not to max length).

    Each record's position_ids restart at 0: transformers reads the resets as record
    boundaries and builds a block-diagonal causal mask (or varlen flash attention). Padding
    continues the last record's positions, so an unpacked row is one plain causal sequence;
    pad tokens come after every real token, so causality already hides them, and their
    labels are IGNORE_INDEX. With `block_mask` an explicit additive 4-D mask is built too,
    for kernels that do not honour position_ids.
    """
    import torch

    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.zeros((len(rows), width), dtype=torch.long)
    real_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            n = len(examples[i].input_ids)
            ids[r, at:at + n] = torch.tensor(examples[i].input_ids)
            labels[r, at:at + n] = torch.tensor(examples[i].labels)
            positions[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = k
            at += n
        real_tokens += at
        if at < width:
            start = positions[r, at - 1] + 1 if at else 0
            positions[r, at:] = torch.arange(start, start + width - at)
            segment[r, at:] = max(len(row) - 1, 0)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "real_tokens": real_tokens}
    if block_mask:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = segment[:, :, None] == segment[:, None, :]
        allowed = (same & causal)[:, None]
        batch["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return batch


def encode_all(records: list[dict], tokenizer, template: str, max_length: int) -> list[EncodedExample]:
    from tqdm import tqdm

    out = []
    for record in tqdm(records, desc="tokenizing", unit="rec", disable=len(records) < 1000, file=sys.stderr):
        try:
            out.append(encode_example(record, tokenizer, template, max_length))
        except ValueError as e:
            raise UserError(f"--template {template}: {e}") from None
    return out


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


def packing_honoured(lm, device) -> bool:
    """Do per-record position_ids isolate records in this model's attention kernel?"""
    import torch

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, base.config.vocab_size, (1, n), generator=gen).to(device) for n in PROBE_LENGTHS)
    decoder = base.get_decoder()
    was_training = decoder.training
    decoder.eval()
    with torch.no_grad():
        def run(ids, pos):
            return decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state.float()
        packed = run(torch.cat([a, b], 1), torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None].to(device))
        alone = run(b, torch.arange(b.shape[1])[None].to(device))
    decoder.train(was_training)
    return bool((packed[:, a.shape[1]:] - alone).abs().max() < PROBE_TOLERANCE)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINT_DIR
    found = [p for p in root.glob("step-*") if (p / TRAINER_STATE).exists()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, wrapper, optimizer, scheduler, output_dir: Path, state: dict, lora: bool) -> None:
    """Model weights (safetensors), optimizer and scheduler state (tensors only), and the step."""
    import torch

    path = output_dir / CHECKPOINT_DIR / f"step-{state['step']:06d}"
    lm = accelerator.unwrap_model(wrapper).lm
    full_state = accelerator.get_state_dict(wrapper)  # every rank must take part under FSDP
    sharded = accelerator.distributed_type.name == "FSDP"
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        prefix = "lm."
        weights = {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}
        if lora:
            lm.save_pretrained(tmp / "adapter")
        else:
            lm.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(torch.get_rng_state(), tmp / "rng.pt")
    accelerator.wait_for_everyone()
    tmp = path.with_name(path.name + ".tmp")
    # Under FSDP each rank holds a shard of the Adam state; under DDP they are all equal.
    if sharded or accelerator.is_main_process:
        torch.save(optimizer.state_dict(), tmp / f"optimizer.{accelerator.process_index if sharded else 0}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, state)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_optimizer_state(accelerator, optimizer, scheduler, path: Path) -> None:
    import torch

    sharded = accelerator.distributed_type.name == "FSDP"
    rank = accelerator.process_index if sharded else 0
    # weights_only: a checkpoint folder is data, and unpickling arbitrary objects would run code.
    optimizer.load_state_dict(torch.load(path / f"optimizer.{rank}.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True))


# ----------------------------------------------------------------------------- outputs

def draw_loss(ax, history: list[dict]) -> bool:
    """Train and validation loss of `metrics.jsonl` rows on `ax`; False when there is none to draw."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h and "step" in h]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on response tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    return bool(train or val)


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_loss(ax, history)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def preflight(examples: list[EncodedExample], n_records: int, n_val: int, steps_per_epoch: int, total_steps: int,
              cfg: Config, world: int, packing_mode: str) -> str:
    n = len(examples)
    truncated = sum(e.truncated for e in examples)
    dropped = sum(e.dropped for e in examples)
    kept = [e for e in examples if not e.dropped]
    tokens = sum(len(e.input_ids) for e in kept)
    trained = sum(e.num_trained_tokens for e in kept)
    longest = max((e.full_length for e in examples), default=0)
    return "\n".join([
        f"pre-flight: {n_records:,} records: {n:,} train, {n_val:,} validation",
        f"  tokens (train, after truncation): {tokens:,}, of which trained (response + EOS): {trained:,} ({trained / max(tokens, 1):.0%})",
        f"  truncated at {cfg.max_length}: {truncated:,} ({truncated / max(n, 1):.1%}); "
        f"dropped (response cut away entirely): {dropped:,} ({dropped / max(n, 1):.1%})",
        f"  longest record: {longest:,} tokens",
        f"  batch: {cfg.batch_size} rows x {cfg.grad_accum} accumulation x {world} process(es)"
        + (f", packed ({packing_mode})" if cfg.packing else ", length-grouped"),
        f"  steps per epoch: {steps_per_epoch:,}; total steps: {total_steps:,}",
    ])


# ----------------------------------------------------------------------------- run

def run(cfg: Config, *, client=None) -> Stats:
    """Train; returns Stats. `client` is unused (stages share one signature)."""
    started = time.time()
    output_dir = Path(cfg.output_dir)
    records = load_training_records(cfg.data, cfg.template)
    if cfg.template == AUTO_TEMPLATE:
        # Resolved here so train_config.json (which eval reads) names the template really used.
        cfg = dataclasses.replace(cfg, template="chat" if any("messages" in r for r in records) else "alpaca")
    check_output_folder(output_dir, "--output-dir")  # before the model loads
    resume_from = None
    if cfg.resume:
        found = checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume: no checkpoint in {output_dir / CHECKPOINT_DIR}")
        resume_from = found[-1]
        saved = json.loads((output_dir / "train_config.json").read_text())["config"]
        now = to_dict(cfg)
        changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != now.get(k)]
        if changed:
            raise UserError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the run "
                            f"in {output_dir}; resume with the same values or use a new --output-dir")

    from pipeline.models import resolve_model

    base_path = resolve_model(cfg.model)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    device = cfg.device
    if device == "auto":
        from pipeline.models import pick_device
        device = pick_device()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    # Mixed precision is plain torch autocast rather than Accelerator(mixed_precision=...):
    # accelerate's state is process-wide and refuses a second run in the same process (the
    # benchmark, tests) with another precision; weights and Adam state stay fp32 either way.
    accelerator = Accelerator(cpu=(device == "cpu"), mixed_precision="no")
    autocast = functools.partial(torch.autocast, device_type=accelerator.device.type, dtype=torch.bfloat16,
                                 enabled=precision == "bf16")
    main = accelerator.is_main_process
    world = accelerator.num_processes
    set_seed(cfg.seed)

    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.eos_token_id is None:
        raise UserError(f"--model {cfg.model}: the tokenizer has no EOS token, so responses cannot end")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
    train_all = encode_all(train_records, tokenizer, cfg.template, cfg.max_length)
    val_all = encode_all(val_records, tokenizer, cfg.template, cfg.max_length)
    train_examples = [e for e in train_all if not e.dropped]
    val_examples = [e for e in val_all if not e.dropped]
    if not train_examples:
        raise UserError(f"{cfg.data}: every record's response is cut away at --max-length {cfg.max_length}")

    # Model: the last checkpoint's weights when resuming full fine-tuning, else the base.
    load_from = resume_from if resume_from is not None and not cfg.lora else base_path
    model = AutoModelForCausalLM.from_pretrained(load_from, dtype=torch.float32)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_from is not None:
            model = PeftModel.from_pretrained(model, resume_from / "adapter", is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=cfg.lora, lora_alpha=LORA_ALPHA_PER_RANK * cfg.lora, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    model.to(accelerator.device)
    block_mask = bool(cfg.packing) and not packing_honoured(model, accelerator.device)
    packing_mode = "explicit block-diagonal 4-D mask" if block_mask else "per-record position_ids"

    per_step = cfg.grad_accum * world  # micro-batches per optimizer step
    epoch_batches = len(plan_batches(train_examples, cfg.batch_size, cfg.packing, cfg.max_length, cfg.seed, 0))
    steps_per_epoch = math.ceil(epoch_batches / per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs
    if main:
        print(preflight(train_all, len(records), len(val_records), steps_per_epoch, total_steps, cfg, world, packing_mode), flush=True)

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    wrapper = make_loss_module(model)
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)

    start_step = 0
    trained_total = 0
    if resume_from is not None:
        load_optimizer_state(accelerator, optimizer, scheduler, resume_from)
        state = json.loads((resume_from / TRAINER_STATE).read_text())
        start_step, trained_total = state["step"], state["trained_tokens"]
        if main:
            print(f"resuming from {resume_from} at step {start_step}", flush=True)

    history: list[dict] = []
    metrics_path = output_dir / "metrics.jsonl"
    if main:
        old = [r for _, r in read_records(metrics_path)] if resume_from is not None and metrics_path.exists() else []
        history = [r for r in old if r.get("step", 0) <= start_step]
        write_jsonl_atomic(metrics_path, history)
        write_jsonl_atomic(output_dir / "val.jsonl", val_records)
        write_json_atomic(output_dir / "train_config.json", {
            "stage": "finetune", "config": to_dict(cfg), "base_model_path": str(base_path), "device": str(accelerator.device),
            "precision": precision, "processes": world, "distributed": accelerator.distributed_type.name,
            "packing_mode": packing_mode if cfg.packing else None, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "train_records": len(train_records), "val_records": len(val_records)})
    log = AppendLog(metrics_path) if main else None

    @functools.lru_cache(maxsize=1)
    def epoch_plan(epoch: int) -> list:
        return plan_batches(train_examples, cfg.batch_size, cfg.packing, cfg.max_length, cfg.seed, epoch)

    def micro_batches_for(step: int) -> list[dict | None]:
        """This rank's micro-batches for global step `step` (None where the epoch ran out)."""
        epoch, offset = divmod(step, steps_per_epoch)
        plan = epoch_plan(epoch)
        picked = []
        for j in range(cfg.grad_accum):
            i = offset * per_step + j * world + accelerator.process_index
            picked.append(collate(plan[i], train_examples, pad_id, block_mask) if i < len(plan) else None)
        return picked

    def to_device(batch: dict) -> dict:
        return {k: v.to(accelerator.device) for k, v in batch.items() if k != "real_tokens"}

    def reduce_sum(*values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
        return accelerator.reduce(t, reduction="sum").tolist() if world > 1 else t.tolist()

    def validate() -> float | None:
        if not val_examples:
            return None
        wrapper.eval()
        plan = plan_batches(val_examples, cfg.batch_size, cfg.packing, cfg.max_length, cfg.seed, 0)
        loss_sum = count = 0.0
        with torch.no_grad():
            for rows in plan[accelerator.process_index::world]:
                with autocast():
                    s, _, n = wrapper(**to_device(collate(rows, val_examples, pad_id, block_mask)))
                loss_sum += float(s)
                count += n
        wrapper.train()
        loss_sum, count = reduce_sum(loss_sum, count)
        return loss_sum / max(count, 1)

    from tqdm import tqdm

    wrapper.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", disable=not main, file=sys.stderr)
    window_start = time.time()
    last: dict = {}
    for step in range(start_step, total_steps):
        batches = micro_batches_for(step)
        real = [b for b in batches if b is not None]
        local_trained = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in real)
        local_tokens = sum(b["real_tokens"] for b in real)
        global_trained, global_tokens = reduce_sum(local_trained, local_tokens)
        step_loss = step_correct = 0.0
        for j, batch in enumerate(batches):
            weight = 1.0
            if batch is None:  # keep every rank's collectives in step; this one contributes nothing
                batch, weight = collate(micro_batch_filler(train_examples), train_examples, pad_id, block_mask), 0.0
            sync = j == len(batches) - 1
            with (accelerator.no_sync(wrapper) if not sync and world > 1 else contextlib.nullcontext()):
                with autocast():
                    loss_sum, correct, _ = wrapper(**to_device(batch))
                # Token-weighted over the whole global step: DDP averages gradients over
                # processes, so scale by the process count to get a sum over all ranks.
                accelerator.backward(loss_sum * (weight * world / max(global_trained, 1)))
            step_loss += float(loss_sum.detach()) * weight
            step_correct += float(correct) * weight
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_correct = reduce_sum(step_loss, step_correct)
        trained_total += int(global_trained)
        elapsed = max(time.time() - window_start, 1e-9)
        window_start = time.time()
        last = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                "loss": step_loss / max(global_trained, 1), "lr": scheduler.get_last_lr()[0],
                "token_accuracy": step_correct / max(global_trained, 1),
                "tokens_per_s": global_tokens / elapsed, "trained_tokens_per_s": global_trained / elapsed,
                "trained_tokens": int(global_trained)}
        is_last = step + 1 == total_steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or is_last:
            val_loss = validate()
            if val_loss is not None:
                last["val_loss"] = val_loss
            window_start = time.time()  # validation time is not training throughput
        if main:
            log.write(last)
            history.append(last)
            bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['token_accuracy']:.2f}")
            bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and not is_last:
            save_checkpoint(accelerator, wrapper, optimizer, scheduler, output_dir,
                            {"step": step + 1, "trained_tokens": trained_total}, bool(cfg.lora))
            window_start = time.time()
    bar.close()
    if log is not None:
        log.close()

    # Final outputs: the model (merged too with --merge) and tokenizer, the plot, a summary.
    save_final(accelerator, wrapper, tokenizer, output_dir, cfg)
    stats = Stats(records=len(records), train_records=len(train_records), val_records=len(val_records),
                  truncated=sum(e.truncated for e in train_all), dropped=sum(e.dropped for e in train_all),
                  steps=total_steps, trained_tokens=trained_total, final_loss=last.get("loss", float("nan")),
                  final_val_loss=last.get("val_loss"), seconds=time.time() - started, output_dir=str(output_dir),
                  history=history)
    if main:
        plot_loss(history, output_dir / "loss.png")
        print(summary(stats, history), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return stats


def micro_batch_filler(examples: list[EncodedExample]) -> list[list[int]]:
    """A one-row batch (the shortest example) run with weight 0 by a rank whose share ran out."""
    return [[min(range(len(examples)), key=lambda i: len(examples[i].input_ids))]]


def save_final(accelerator, wrapper, tokenizer, output_dir: Path, cfg: Config) -> None:
    full_state = accelerator.get_state_dict(wrapper)  # every rank takes part under FSDP
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    lm = accelerator.unwrap_model(wrapper).lm
    lm.config.use_cache = True  # for generation and serving
    if cfg.lora:
        lm.save_pretrained(output_dir / "adapter")
        tokenizer.save_pretrained(output_dir / "adapter")
        if cfg.merge:
            merged = lm.merge_and_unload()
            merged.save_pretrained(output_dir, safe_serialization=True)
    else:
        weights = {k[len("lm."):]: v for k, v in full_state.items() if k.startswith("lm.")}
        lm.save_pretrained(output_dir, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def summary(stats: Stats, history: list[dict]) -> str:
    measured = [h for h in history[1:]] or history  # the first step includes warm-up
    tps = sum(h["trained_tokens_per_s"] for h in measured) / max(len(measured), 1)
    val = f", validation loss {stats.final_val_loss:.4f}" if stats.final_val_loss is not None else ""
    first = history[0]["loss"] if history else float("nan")
    return (f"finetune: {stats.steps} steps on {stats.train_records:,} records ({stats.dropped} dropped, "
            f"{stats.truncated} truncated), {stats.trained_tokens:,} trained tokens, "
            f"loss {first:.4f} -> {stats.final_loss:.4f}{val}, ~{tps:,.0f} trained tokens/s, "
            f"{stats.seconds:.0f} s; model in {stats.output_dir}")
