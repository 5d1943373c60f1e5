"""Preference optimisation after supervised tuning: DPO (or reference-free SimPO) on preference pairs.

    python -m pipeline dpo --data data/preferences.jsonl --model runs/sft --output-dir runs/dpo
    python -m pipeline dpo ... --loss simpo                 # reference-free: no reference pass
    python -m pipeline dpo ... --lora 16 --merge --lr 5e-6  # adapters only
    accelerate launch -m pipeline dpo ...                   # DDP, or FSDP with --config_file

Supervised tuning can only make the one reference answer more likely; it cannot tell the model
that of two plausible answers a person prefers this one. A pair (`pipeline.preferences`: a
prompt, the answer preferred and the answer turned down, from the judge in `prefs` or a person
in `label`) says exactly that, and DPO (Rafailov et al. 2023) trains on it directly: it raises
the chosen answer's log-probability relative to a frozen reference model (the SFT model itself)
and lowers the rejected one's, with `beta` bounding how far the policy drifts from the
reference (`pipeline.preference_loss`).

How it is computed:
- Each answer is rendered and masked exactly as `finetune` renders and masks a record
  (`preferences.training_records` + `templates.encode_example`, Alpaca or chat), so the
  log-probabilities are summed over the response tokens (and EOS) only.
- The reference model's log-probabilities are computed once, before the first step, by the
  model as loaded (the policy at step 0), over the same micro-batches step 0 trains on, and
  saved in `reference_logps.json` in the output folder. Training then holds one model, and
  `--resume` reads them back instead of needing the original model again.
- The chosen and rejected answers of a micro-batch go through the model in one forward. Only
  response positions reach the LM head (a 49k-token vocabulary over every prompt position is
  a large share of a small model's compute), and with `--packing` (the default) short answers
  share a row as wide as the micro-batch's longest one, each attending only to itself
  (per-sequence `position_ids`, checked at start as in `finetune`), so little compute goes to
  padding and none to wider attention.
- The rest is `finetune`'s loop (`pipeline.training`): accelerate (DDP/FSDP), LoRA and
  `--merge`, bf16 autocast where supported, checkpoints, `--resume` / `--overwrite`, the saved
  model with the serving chat template.

Outputs in `--output-dir`: the model and tokenizer, `train_config.json` (eval reads its template),
`metrics.jsonl` (per step: loss, reward_accuracy, reward_margin, chosen_logps, rejected_logps,
tokens/s), `loss.png` (loss and reward accuracy), `reference_logps.json`, `checkpoints/`.
`eval --model runs/dpo --baseline runs/sft` with a judge then gives the win rate against SFT.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from pipeline.batching import collate, encode_all, pack_rows, packing_honoured, plan_batches
from pipeline.cards import CARD_FILE, write_model_card
from pipeline.config import option, to_dict, validate
from pipeline.errors import UserError
from pipeline.jsonl import (AppendLog, locked_outputs, read_records, write_json_atomic)
from pipeline.models import ADAPTER_DIR
from pipeline.preference_loss import DPO_BETA, SIMPO_BETA, SIMPO_GAMMA, dpo_loss, simpo_loss
from pipeline.preferences import load_pairs, pair_format, training_records
from pipeline.records import CHAT_TEMPLATE, TRAIN_CONFIG, train_settings
from pipeline.templates import IGNORE_INDEX, TEMPLATES, EncodedExample
from pipeline.training import (AUTO_TEMPLATE, resumed_history, claim_run_dir, RunOptions, Trainer, check_run_flags, checkpoint_if_due,
                               open_run, restore_run, check_resume_state, file_digest, load_training_model,
                               load_training_tokenizer, make_trainer, save_model, train_step, TRACKER_DIR,
                               log_to_trackers)

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
REFERENCE_FILE = "reference_logps.json"
RUN_FILES = (METRICS_FILE, TRAIN_CONFIG, "config.json", LOSS_PLOT, REFERENCE_FILE, CARD_FILE, TRACKER_DIR)
# What `--overwrite` removes besides the checkpoints (as in finetune: outputs a new run might not rewrite).
EARLIER_RUN_FILES = RUN_FILES + (ADAPTER_DIR, "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
                                 "adapter_model.safetensors")
# Anything that changes the data order, the batch contents, the loss or the trained parameters.
RESUME_MUST_MATCH = ("data", "model", "template", "loss", "beta", "simpo_gamma", "max_length", "batch_size",
                     "grad_accum", "packing", "lora", "seed", "epochs", "max_steps", "precision")

LOSSES = {"dpo": DPO_BETA, "simpo": SIMPO_BETA}  # each loss and its default beta
CHOSEN, REJECTED = 0, 1  # columns of the reference log-probabilities
MIN_ELAPSED_S = 1e-9  # a step's duration floor, against division by 0


@dataclass(frozen=True)
class Config(RunOptions):
    data: str = option("data/preferences.jsonl", "preference pairs (prompt / chosen / rejected JSONL, as `prefs` writes)")
    output_dir: str = option("runs/dpo", "where the model, metrics and plots go")
    model: str = option("runs/sft", "the model to improve, and the reference DPO keeps it near: usually the SFT run")
    template: Literal["auto", "alpaca", "chat"] = option("auto", "prompt template; auto: chat for conversational pairs, "
                                                         "else the one --model was tuned with (train_config.json), else alpaca")
    loss: Literal["dpo", "simpo"] = option("dpo", "dpo: sigmoid DPO against the reference model; simpo: reference-free "
                                           "SimPO on average log-probabilities (no reference pass)")
    beta: float | None = option(None, f"reward scale (default: {DPO_BETA} for dpo, {SIMPO_BETA} for simpo)", above=0)
    simpo_gamma: float = option(SIMPO_GAMMA, "SimPO's target reward margin", min=0)
    epochs: int = option(1, "passes over the pairs", min=1)
    max_steps: int = option(-1, "stop after this many optimizer steps (-1: run all epochs)")
    lr: float = option(1e-6, "peak learning rate (DPO paper and TRL: 1e-6 for full tuning; LoRA wants ~5e-6..5e-5)", above=0)
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("linear", "schedule after warmup")
    warmup_ratio: float = option(0.1, "share of the steps spent warming the learning rate up from 0", min=0, below=1)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    batch_size: int = option(8, "pairs per device per micro-batch (both answers of each go through one forward)", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    max_length: int = option(512, "tokens per prompt + answer (longer ones are cut at the end) and per packed row", min=1)
    packing: bool = option(True, "pack a micro-batch's short answers together into rows as wide as its longest, "
                                 "each isolated (less padding)")
    lora: int = option(0, "LoRA rank: train low-rank adapters only (0: full tuning)", min=0)
    merge: bool = option(False, "with --lora: also save the adapter merged into the model")
    seed: int = option(42, "seed for the data order and initialisation of adapters")

    def __post_init__(self):
        validate(self)
        check_run_flags(self)

    @property
    def reward_beta(self) -> float:
        return self.beta if self.beta is not None else LOSSES[self.loss]


@dataclass
class Stats:
    pairs: int = 0
    trained_pairs: int = 0
    truncated: int = 0
    dropped: int = 0
    steps: int = 0
    trained_tokens: int = 0
    final_loss: float = float("nan")
    final_reward_accuracy: float = float("nan")
    seconds: float = 0.0
    output_dir: str = ""
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- data

def resolve_template(cfg: Config, pairs: list[dict]) -> Config:
    """`--template auto` made concrete, so train_config.json (which eval reads) names the template used."""
    if cfg.template != AUTO_TEMPLATE:
        return cfg
    if any(pair_format(p) == "messages" for p in pairs):
        return dataclasses.replace(cfg, template=CHAT_TEMPLATE)
    from pipeline.models import resolve_model

    # The prompt format the model learnt in SFT: DPO on another would tune a prompt it never sees.
    tuned = train_settings(resolve_model(cfg.model)).get("template")
    return dataclasses.replace(cfg, template=tuned if tuned in TEMPLATES else "alpaca")


def pair_line(path, pair_id) -> int | None:
    """The line of the pair with this id (only for an error message)."""
    return next((line for line, record in read_records(path) if record.get("id") == pair_id), None)


def encode_pairs(cfg: Config, pairs: list[dict], tokenizer) -> list[EncodedExample]:
    """Two examples per pair, chosen then rejected, masked as `finetune` masks a record."""
    records = []
    for pair in pairs:
        try:
            records += training_records(pair)
        except ValueError as e:
            raise UserError(f"{cfg.data}:{pair_line(cfg.data, pair['id'])}: instruction: {e}") from None
    try:
        return encode_all(records, tokenizer, cfg.template, cfg.max_length)
    except UserError as e:
        raise UserError(f"{cfg.data}: {e}") from None


@dataclass
class PairData:
    pairs: list[dict]  # as read
    examples: list[EncodedExample]  # 2 per pair read: chosen at 2i, rejected at 2i + 1
    kept: list[int]  # pairs trained on: neither answer cut away entirely by --max-length

    @property
    def train_examples(self) -> list[EncodedExample]:
        """2 per kept pair, in the same layout."""
        return [self.examples[2 * i + side] for i in self.kept for side in (CHOSEN, REJECTED)]


def prepare_data(cfg: Config, pairs: list[dict], tokenizer) -> PairData:
    examples = encode_pairs(cfg, pairs, tokenizer)
    kept = [i for i in range(len(pairs)) if not (examples[2 * i].dropped or examples[2 * i + 1].dropped)]
    if not kept:
        raise UserError(f"{cfg.data}: every pair has an answer cut away entirely at --max-length {cfg.max_length}")
    return PairData(pairs, examples, kept)


@dataclass
class PairBatches:
    """This process's micro-batches of pairs for each global step; both answers of a pair in one batch."""

    cfg: Config
    examples: list[EncodedExample]  # chosen at 2i, rejected at 2i + 1
    pad_id: int
    block_mask: bool
    world: int
    rank: int
    reference: object = None  # float32 tensor [pairs, 2] of summed reference log-probabilities (DPO)
    _plan: tuple[int, list] = (-1, [])

    def __post_init__(self):
        self.pairs = len(self.examples) // 2
        self.per_step = self.cfg.grad_accum * self.world
        self.steps_per_epoch = -(-len(self.epoch_plan(0)) // self.per_step)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Pair indices per micro-batch: length-grouped and shuffled per epoch, as finetune plans records."""
        if self._plan[0] != epoch:
            # plan_batches reads only lengths: a pair's length is its two answers' together.
            spans = [SimpleNamespace(input_ids=range(len(self.examples[2 * i].input_ids)
                                                     + len(self.examples[2 * i + 1].input_ids)))
                     for i in range(self.pairs)]
            plan = plan_batches(spans, self.cfg.batch_size, False, self.cfg.max_length, self.cfg.seed, epoch)
            self._plan = (epoch, [[row[0] for row in batch] for batch in plan])
        return self._plan[1]

    def total_steps(self) -> int:
        return self.cfg.max_steps if self.cfg.max_steps > 0 else self.steps_per_epoch * self.cfg.epochs

    def micro_batches(self, step: int) -> list[dict | None]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        plan = self.epoch_plan(epoch)
        indices = [offset * self.per_step + j * self.world + self.rank for j in range(self.cfg.grad_accum)]
        return [self.collate(plan[i]) if i < len(plan) else None for i in indices]

    def filler(self) -> dict:
        """The shortest pair, run with weight 0 (and left out of the metrics) by a rank whose share ran out."""
        shortest = min(range(self.pairs), key=lambda i: len(self.examples[2 * i].input_ids) + len(self.examples[2 * i + 1].input_ids))
        return self.collate([shortest], weight=0.0)

    def collate(self, pair_ids: list[int], weight: float = 1.0) -> dict:
        """One forward's tensors: every chosen answer, then every rejected one, packed or padded.

        `sequence_index` says which of those 2P sequences each token belongs to (-1: padding),
        so the loss module can sum log-probabilities per answer whatever the row layout.
        """
        import torch

        sequences = [2 * i + CHOSEN for i in pair_ids] + [2 * i + REJECTED for i in pair_ids]
        lengths = [len(self.examples[s].input_ids) for s in sequences]
        # Rows as wide as the longest answer: packing then only ever removes padding, never adds
        # attention width (rows of --max-length would cost more per token than short padded rows).
        slots = pack_rows(lengths, max(lengths)) if self.cfg.packing else [[k] for k in range(len(sequences))]
        batch = collate([[sequences[k] for k in row] for row in slots], self.examples, self.pad_id, self.block_mask)
        index = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
        for r, row in enumerate(slots):
            at = 0
            for k in row:
                index[r, at:at + lengths[k]] = k
                at += lengths[k]
        batch.update(sequence_index=index, stat_weight=torch.tensor(weight), pairs=len(pair_ids))
        if self.reference is not None:
            batch["reference_logps"] = self.reference[pair_ids]
        return batch


# ----------------------------------------------------------------------------- model

STAT_NAMES = ("reward_margin", "chosen_logps", "rejected_logps", "trained_tokens")


def make_preference_module(model, loss: str, beta: float, gamma: float = SIMPO_GAMMA):
    """Wrap a causal LM so forward returns the summed pair loss, reward-accuracy wins and the pair count.

    Only response positions go through the LM head; per-answer sums gather by `sequence_index`.
    Per-step metrics besides loss and accuracy (see STAT_NAMES) accumulate on the module in
    `totals`, weighted by the batch's `stat_weight` (0 for a filler batch). An nn.Module, so
    DDP/FSDP wrap it and their hooks see the forward; `logps_only=True` returns the per-answer
    sums instead (the reference pass goes through forward too, as FSDP requires).
    """
    import torch
    import torch.nn.functional as F

    class PreferenceLossModule(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.totals = [0.0] * len(STAT_NAMES)

        def sequence_logps(self, input_ids, labels, position_ids, sequence_index, attention_mask=None):
            """(sum of response-token log-probabilities, response tokens) per sequence, `[2P]` each."""
            base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
            hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                        attention_mask=attention_mask, use_cache=False).last_hidden_state
            targets, owners = labels[:, 1:], sequence_index[:, 1:]
            # Position t predicts token t+1, counted for t+1's sequence only when t is in it too.
            keep = (targets != IGNORE_INDEX) & (owners == sequence_index[:, :-1]) & (owners >= 0)
            logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
            token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")
            n = int(sequence_index.max()) + 1
            sums = torch.zeros(n, device=token_logps.device).index_add(0, owners[keep], token_logps)
            counts = torch.zeros(n, device=token_logps.device).index_add(0, owners[keep], torch.ones_like(token_logps))
            return sums, counts

        def forward(self, input_ids, labels, position_ids, sequence_index, stat_weight, reference_logps=None,
                    attention_mask=None, logps_only=False):
            sums, counts = self.sequence_logps(input_ids, labels, position_ids, sequence_index, attention_mask)
            if logps_only:
                return sums.detach()
            pairs = sums.shape[0] // 2
            if loss == "dpo":
                result = dpo_loss(sums[:pairs], sums[pairs:], reference_logps[:, CHOSEN], reference_logps[:, REJECTED], beta)
            else:
                averages = sums / counts.clamp(min=1)
                result = simpo_loss(averages[:pairs], averages[pairs:], beta, gamma)
            weight = float(stat_weight)
            found = (result.reward_margin * pairs, sums[:pairs].sum(), sums[pairs:].sum(), counts.sum())
            self.totals = [t + weight * float(v.detach()) for t, v in zip(self.totals, found)]
            return result.loss * pairs, result.reward_accuracy.detach() * pairs, pairs

        def take_totals(self) -> list[float]:
            totals, self.totals = self.totals, [0.0] * len(STAT_NAMES)
            return totals

    return PreferenceLossModule(model)


def reference_logps(trainer: Trainer, batches: PairBatches):
    """Summed log-probabilities of every pair's two answers by the model as it is now: `[pairs, 2]`.

    Runs over epoch 0's micro-batches, as step 0 composes them, so at step 0 the policy's
    log-probabilities equal these and the DPO loss is log 2. Every process runs every batch
    (under FSDP all must take part in each forward); it is one forward pass over the data.
    """
    import torch
    from tqdm import tqdm

    out = torch.zeros(batches.pairs, 2)
    trainer.module.eval()
    plan = batches.epoch_plan(0)
    with torch.no_grad():
        for pair_ids in tqdm(plan, desc="reference log-probs", unit="batch", disable=not trainer.main, file=sys.stderr):
            batch = trainer.to_device(batches.collate(pair_ids))
            with trainer.autocast():
                sums = trainer.module(**batch, logps_only=True).float().cpu()
            out[pair_ids, CHOSEN] = sums[:len(pair_ids)]
            out[pair_ids, REJECTED] = sums[len(pair_ids):]
    trainer.module.train()
    return out


def reference_for_run(s: "Session"):
    """The reference log-probabilities: computed now and saved, or (on --resume) read back."""
    import torch

    path = s.output_dir / REFERENCE_FILE
    ids = [s.data.pairs[i]["id"] for i in s.data.kept]
    if s.resume_from is not None:
        import json

        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: the reference log-probabilities of the run to resume are not readable ({e}); "
                            f"start afresh with --overwrite") from None
        if saved.get("ids") != ids or saved.get("settings") != s.settings:
            raise UserError(f"{path}: computed for other pairs or settings than this run's; start afresh with --overwrite")
        return torch.tensor(saved["logps"], dtype=torch.float32)
    reference = reference_logps(s.trainer, s.batches)
    if s.trainer.main:
        write_json_atomic(path, {"settings": s.settings, "ids": ids, "logps": reference.tolist()})
    s.trainer.accelerator.wait_for_everyone()
    return reference


# ----------------------------------------------------------------------------- run

@dataclass
class Session:
    cfg: Config
    output_dir: Path
    trainer: Trainer
    tokenizer: object
    data: PairData
    batches: PairBatches
    total_steps: int
    resume_from: Path | None = None
    settings: dict = field(default_factory=dict)


def claim_output_dir(cfg: Config, output_dir: Path) -> Path | None:
    """Check and lock the output folder before the model loads; the checkpoint to resume, if any."""
    from pipeline.models import resolve_model

    if output_dir.resolve() == resolve_model(cfg.model).resolve():
        raise UserError(f"--output-dir {output_dir}: is the --model folder; training would overwrite the model it "
                        f"starts from: choose another --output-dir")
    return claim_run_dir(cfg, output_dir, RUN_FILES)


def resume_settings(cfg: Config) -> dict:
    now = to_dict(cfg)
    return {**{key: now[key] for key in RESUME_MUST_MATCH}, "data_sha256": file_digest(cfg.data)}


def prepare(cfg: Config, pairs: list[dict], output_dir: Path, resume_from: Path | None) -> Session:
    """Accelerator, tokenizer, pairs, model and optimizer, ready for step 0 (or the resumed step)."""
    settings = resume_settings(cfg)
    accelerator, precision = open_run(cfg, output_dir, resume_from, settings, "dpo", EARLIER_RUN_FILES)
    tokenizer = load_training_tokenizer(cfg)
    data = prepare_data(cfg, pairs, tokenizer)
    model = load_training_model(cfg, resume_from).to(accelerator.device)
    block_mask = cfg.packing and not packing_honoured(model, accelerator.device)
    batches = PairBatches(cfg, data.train_examples, tokenizer.pad_token_id, block_mask, accelerator.num_processes,
                          accelerator.process_index)
    total_steps = batches.total_steps()
    if resume_from is not None:
        check_resume_state(resume_from, settings, total_steps)
    module = make_preference_module(model, cfg.loss, cfg.reward_beta, cfg.simpo_gamma)
    trainer = make_trainer(module, accelerator, precision, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           schedule=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio, total_steps=total_steps)
    return Session(cfg, output_dir, trainer, tokenizer, data, batches, total_steps, resume_from, settings)


def start_outputs(s: Session, start_step: int) -> list[dict]:
    """metrics.jsonl cut back to the resumed step and train_config.json; the history so far."""
    if not s.trainer.main:
        return []
    from pipeline.models import portable_name, resolve_model
    from pipeline.provenance import provenance

    history = resumed_history(s.output_dir / METRICS_FILE, s.resume_from, start_step)
    accelerator = s.trainer.accelerator
    write_json_atomic(s.output_dir / TRAIN_CONFIG, {
        "stage": "dpo", "config": to_dict(s.cfg), "beta": s.cfg.reward_beta, "base_model": portable_name(s.cfg.model),
        "base_model_path": str(resolve_model(s.cfg.model)), "device": str(accelerator.device),
        "precision": s.trainer.precision, "processes": s.trainer.world, "distributed": accelerator.distributed_type.name,
        "steps_per_epoch": s.batches.steps_per_epoch, "total_steps": s.total_steps, "pairs": len(s.data.pairs),
        "train_pairs": len(s.data.kept), "provenance": provenance()})
    return history


def step_row(s: Session, step: int, done, elapsed: float) -> dict:
    """One metrics.jsonl row from a finished step and the totals its forwards accumulated."""
    module = s.trainer.accelerator.unwrap_model(s.trainer.module)
    margin, chosen, rejected, trained = s.trainer.reduce_sum(*module.take_totals())
    pairs = max(done.units, 1)
    return {"step": step, "epoch": round(step / s.batches.steps_per_epoch, 4), "loss": done.loss,
            "lr": s.trainer.scheduler.get_last_lr()[0], "reward_accuracy": done.accuracy,
            "reward_margin": margin / pairs, "chosen_logps": chosen / pairs, "rejected_logps": rejected / pairs,
            "pairs": done.units, "tokens_per_s": done.tokens / elapsed, "trained_tokens_per_s": trained / elapsed,
            "trained_tokens": int(trained)}


def train(s: Session, start_step: int, trained_total: int, history: list[dict]) -> tuple[dict, int]:
    """Steps `start_step`..end: log each and checkpoint on schedule; the last row and tokens trained."""
    from tqdm import tqdm

    cfg, trainer = s.cfg, s.trainer
    log = AppendLog(s.output_dir / METRICS_FILE) if trainer.main else None
    bar = tqdm(total=s.total_steps, initial=start_step, desc="dpo", unit="step", disable=not trainer.main, file=sys.stderr)
    trainer.module.train()
    last: dict = {}
    try:
        for step in range(start_step, s.total_steps):
            started = time.time()
            done = train_step(trainer, s.batches.micro_batches(step), filler=s.batches.filler,
                              units=lambda b: b["pairs"], step=step + 1)
            last = step_row(s, step + 1, done, max(time.time() - started, MIN_ELAPSED_S))
            trained_total += last["trained_tokens"]
            if log is not None:
                log.write(last)
                log_to_trackers(trainer.accelerator, last, step + 1)
                history.append(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['reward_accuracy']:.2f}")
                bar.update(1)
            checkpoint_if_due(trainer, cfg, s.output_dir, step + 1, trained_total, s.total_steps, s.settings)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return last, trained_total


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    """Train on preference pairs; returns Stats. `client` is unused (stages share one signature)."""
    started = time.time()
    pairs = load_pairs(cfg.data)
    cfg = resolve_template(cfg, pairs)
    output_dir = Path(cfg.output_dir)
    resume_from = claim_output_dir(cfg, output_dir)
    s = prepare(cfg, pairs, output_dir, resume_from)
    if cfg.loss == "dpo":
        s.batches.reference = reference_for_run(s)
    if s.trainer.main:
        print(preflight(s), flush=True)
    start_step, trained_total = restore_run(s.trainer, s.resume_from, s.settings, s.total_steps)
    history = start_outputs(s, start_step)
    last, trained_total = train(s, start_step, trained_total, history)
    save_model(s.trainer, output_dir, s.tokenizer, cfg, s.total_steps)
    examples = s.data.examples
    stats = Stats(pairs=len(pairs), trained_pairs=len(s.data.kept), truncated=sum(e.truncated for e in examples),
                  dropped=len(pairs) - len(s.data.kept), steps=s.total_steps, trained_tokens=trained_total,
                  final_loss=last.get("loss", float("nan")), final_reward_accuracy=last.get("reward_accuracy", float("nan")),
                  seconds=time.time() - started, output_dir=str(output_dir), history=history)
    if s.trainer.main:
        from pipeline.plots import plot_preference

        plot_preference(history, output_dir / LOSS_PLOT)
        write_model_card(output_dir, stage="dpo", model=cfg.model, data_files=[cfg.data], records=pairs,
                         hyperparameters=to_dict(cfg), tags=[cfg.loss, *(["lora"] if cfg.lora else [])])
        print_summary(stats, history)
    s.trainer.accelerator.wait_for_everyone()
    s.trainer.accelerator.end_training()
    return stats


def preflight(s: Session) -> str:
    from pipeline.token_budget import cuts_by_language, describe as describe_cuts, record_language

    cfg, data = s.cfg, s.data
    examples = data.train_examples
    tokens = sum(len(e.input_ids) for e in examples)
    trained = sum(e.num_trained_tokens for e in examples)
    languages = [record_language(r) for p in data.pairs for r in training_records(p)]
    reference = ("none (SimPO is reference-free)" if cfg.loss == "simpo"
                 else f"{cfg.model} as loaded, summed over each answer, in {s.output_dir / REFERENCE_FILE}")
    return "\n".join([
        f"pre-flight: {len(data.pairs):,} pairs, {len(data.kept):,} trained on "
        f"({len(data.pairs) - len(data.kept):,} dropped: an answer cut away entirely at --max-length {cfg.max_length})",
        f"  tokens (both answers with their prompts): {tokens:,}, of which trained (answers + EOS): {trained:,} "
        f"({trained / max(tokens, 1):.0%})",
        f"  cut at --max-length {cfg.max_length}, per language (answers): {describe_cuts(cuts_by_language(data.examples, languages))}",
        f"  loss: {cfg.loss}, beta {cfg.reward_beta}" + (f", gamma {cfg.simpo_gamma}" if cfg.loss == "simpo" else "")
        + f"; template {cfg.template}; reference log-probs: {reference}",
        f"  batch: {cfg.batch_size} pairs x {cfg.grad_accum} accumulation x {s.trainer.world} process(es), "
        + ("answers packed in rows as wide as the longest" if cfg.packing else "padded"),
        f"  steps per epoch: {s.batches.steps_per_epoch:,}; total steps: {s.total_steps:,}",
    ])


def print_summary(stats: Stats, history: list[dict]) -> None:
    measured = history[1:] or history  # the first step includes warm-up
    tps = sum(h["trained_tokens_per_s"] for h in measured) / max(len(measured), 1)
    first = history[0] if history else {}
    print(f"dpo: {stats.steps} steps on {stats.trained_pairs:,} pairs ({stats.dropped} dropped), "
          f"loss {first.get('loss', float('nan')):.4f} -> {stats.final_loss:.4f}, reward accuracy "
          f"{first.get('reward_accuracy', float('nan')):.2f} -> {stats.final_reward_accuracy:.2f}, "
          f"{stats.trained_tokens:,} trained tokens, ~{tps:,.0f} trained tokens/s, {stats.seconds:.0f} s; "
          f"model in {stats.output_dir}", flush=True)
