"""Benchmark `pipeline finetune` against TRL's SFTTrainer at its best: trained tokens/s, one process.

    .venv/bin/python bench/bench_sft.py                    # CPU, fp32, 4 steps per run (minutes on 2 cores)
    .venv/bin/python bench/bench_sft.py --steps 3 --modes packed
    .venv/bin/python bench/bench_sft.py --device cuda --precision bf16 --steps 20   # bench/gpu.sh

Same model (the embedded SmolLM2-135M-Instruct), the same Alpaca records (the first `--records`
of ../shared/data/alpaca_5000.json whose prompt + response fit in `--max-length`, so neither
side truncates; skipped with a message when the file is absent), the same Alpaca prompt text
(TRL gets `prompt` / `completion` pairs built with pipeline.templates), the same tokens per step
(`--packed-batch-size` rows of max length packed; `--batch-size` records unpacked), the same
learning rate, fp32 weights and Adam state on both sides, and bf16 (when asked) as torch
autocast on both sides.

TRL at its best settings for this job (trl >= 1.16):
- packed: `packing=True` with best-fit-decreasing packing, which TRL runs padding-free (the
  batch flattened into one sequence, records told apart by `position_ids`, so isolated);
- unpacked: `padding_free=True` (no padding at all; length grouping has nothing left to save,
  so `train_sampling_strategy="group_by_length"` does not apply);
- completion-only loss, its fused LM head, no gradient checkpointing, bf16 off (its default is on,
  even on CPU: precision is set the same way for both).

Both trainers run in this one process, their steps interleaved (ours, TRL, TRL, ours, ...), so a
machine loaded by other work slows both alike. Each step is timed from taking the batch (our
collate, TRL's collator) to the optimizer step. Measured: trained (response + EOS) tokens per
second over the steps after the first (which pays one-off warm-up). Prints the torch threads and
the load average before and after, model FLOPs utilisation on a GPU, and LAST the line
`packed vs TRL packed: N.Nx`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"
LR = 2e-5  # Alpaca's
SEED = 0
IGNORE = -100  # the label no loss is computed on, in both trainers
# bf16 dense peak of common GPUs, for model FLOPs utilisation (vendor data sheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
# Training FLOPs per token per parameter: forward 2, backward 4 (Kaplan et al. 2020; PaLM app. B).
FLOPS_PER_PARAM_TOKEN = 6


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Ours:
    """`pipeline finetune`'s own session (the stage's prepare and train_step), driven one step at a time."""

    def __init__(self, args, data_path: Path, out_dir: Path, packing: bool):
        from pipeline.finetune import Config, load_training_records, prepare, resolve_template, trained_tokens

        batch = args.packed_batch_size if packing else args.batch_size
        cfg = Config(data=str(data_path), output_dir=str(out_dir), model=args.model_dir, max_steps=args.steps,
                     batch_size=batch, packing=packing, max_length=args.max_length, lr=LR, lr_schedule="cosine",
                     val_fraction=0.0, eval_every=0, save_every=0, precision=args.precision, device=args.device,
                     gradient_checkpointing=False, seed=SEED)
        records = load_training_records(cfg.data, cfg.template)
        cfg = resolve_template(cfg, records)
        self.session = prepare(cfg, records, out_dir, None)
        self.units = trained_tokens
        self.session.trainer.module.train()
        self.note = f"batch {batch}, " + (f"packed ({self.session.packing_mode})" if packing else "length-grouped")

    def step(self, i: int) -> tuple[int, int, float]:
        from pipeline.training import train_step

        s = self.session
        done = train_step(s.trainer, s.batches.micro_batches(i), filler=s.batches.filler, units=self.units, step=i + 1)
        return done.units, done.tokens, done.loss


class Trl:
    """TRL's SFTTrainer: its dataset preparation, packer, collator, loss and optimizer, one step at a time."""

    def __init__(self, args, records: list[dict], out_dir: Path, packing: bool):
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from pipeline.templates import build_prompt

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        rows = [{"prompt": build_prompt(r, "alpaca", tokenizer), "completion": r["output"]} for r in records]
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        batch = args.packed_batch_size if packing else args.batch_size
        config = SFTConfig(
            output_dir=str(out_dir), max_steps=args.steps, per_device_train_batch_size=batch,
            gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine", logging_steps=1,
            save_strategy="no", eval_strategy="no", report_to="none", seed=SEED, dataloader_num_workers=0,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=args.device == "cpu",
            packing=packing, padding_free=True, completion_only_loss=True,
            # Unpacked padding-free refuses a max length (it would not enforce it): the records were
            # chosen to fit in --max-length, so nothing would be cut anyway.
            max_length=args.max_length if packing else None,
        )
        self.trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=args.steps)
        self.loader = iter(self.trainer.get_train_dataloader())
        self.autocast = torch.autocast(device_type=self.trainer.args.device.type, dtype=torch.bfloat16,
                                       enabled=args.precision == "bf16")
        self.note = f"batch {batch}, " + ("packed (BFD, padding-free)" if packing else "padding-free")

    def step(self, i: int) -> tuple[int, int, float]:
        t = self.trainer
        inputs = next(self.loader)
        units = int((inputs["labels"][..., 1:] != IGNORE).sum())
        tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        with self.autocast:
            loss = t.training_step(t.model, inputs, num_items_in_batch=units)
        t.optimizer.step()
        t.lr_scheduler.step()
        t.model.zero_grad(set_to_none=True)
        return units, tokens, float(loss)


def fitting_records(records: list[dict], count: int, model_dir: str, max_length: int) -> tuple[list[dict], int]:
    """The first `count` records whose prompt + response + EOS fit in max_length; and how many were passed over."""
    from transformers import AutoTokenizer

    from pipeline.templates import encode_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kept, skipped = [], 0
    for record in records:
        if len(kept) == count:
            break
        if encode_example(record, tokenizer, "alpaca", max_length).truncated:
            skipped += 1
        else:
            kept.append(record)
    return kept, skipped


def run_interleaved(runners: dict, steps: int) -> dict[str, dict]:
    """Step every runner `steps` times, alternating the order each step; per-run rates after step 1."""
    log: dict[str, list] = {name: [] for name in runners}
    names = list(runners)
    for i in range(steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            synchronize()
            started = time.perf_counter()
            units, tokens, loss = runners[name].step(i)
            synchronize()
            log[name].append({"seconds": time.perf_counter() - started, "trained": units, "tokens": tokens, "loss": loss})
        print(f"  step {i + 1}/{steps}: " + ", ".join(f"{n} {log[n][-1]['seconds']:.1f} s" for n in names), flush=True)
    out = {}
    for name, rows in log.items():
        use = rows[1:] or rows
        seconds = sum(r["seconds"] for r in use)
        out[name] = {"trained_tokens_per_s": sum(r["trained"] for r in use) / seconds,
                     "tokens_per_s": sum(r["tokens"] for r in use) / seconds, "steps": rows,
                     "note": runners[name].note}
    return out


def mfu(tokens_per_s: float, n_params: int) -> str:
    import torch

    if not torch.cuda.is_available():
        return "n/a (CPU)"
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return f"n/a (unknown peak for {name})"
    return f"{FLOPS_PER_PARAM_TOKEN * n_params * tokens_per_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=256, help="Alpaca records that fit in --max-length")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not measured)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="records per step, unpacked")
    parser.add_argument("--packed-batch-size", type=int, default=2, help="rows of --max-length per step, packed")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="unpacked,packed", help="comma-separated: unpacked, packed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores, "
                        "pipeline.models.free_cores: OMP_NUM_THREADS when set)")
    parser.add_argument("--model-dir", default=None)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if not ALPACA.exists():
        print(f"skipped: {ALPACA} is not here (the benchmark needs real Alpaca records)")
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("skipped: TRL is not installed (pip install -e '.[bench]')")
        return 0
    import torch

    from pipeline.models import embedded_model_dir, free_cores

    torch.set_num_threads(args.threads or free_cores())
    print(f"threads: {torch.get_num_threads()}; load average before: {load_text()}", flush=True)
    args.model_dir = args.model_dir or str(embedded_model_dir())
    records, skipped = fitting_records(json.loads(ALPACA.read_text()), args.records, args.model_dir, args.max_length)
    modes = args.modes.split(",")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_path = work / "alpaca.jsonl"
        data_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        for mode in modes:
            packing = mode == "packed"
            print(f"{mode}: building both trainers ...", flush=True)
            runners = {f"ours {mode}": Ours(args, data_path, work / f"ours-{mode}", packing),
                       f"TRL {mode}": Trl(args, records, work / f"trl-{mode}", packing)}
            results.update(run_interleaved(runners, args.steps))
            del runners

    from safetensors import safe_open

    with safe_open(str(Path(args.model_dir) / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"\nSmolLM2-135M, {len(records)} Alpaca records that fit in {args.max_length} tokens ({skipped} longer passed "
          f"over), {args.precision}, {args.device}, {args.steps} steps each (rates over steps 2..{args.steps})")
    # The trained share differs between the two sides' rows over a few steps (each packs its own
    # rows); over the whole data it is the same, so a gap there is sampling, not speed.
    print(f"{'run':18s} {'trained tok/s':>14s} {'all tok/s':>10s} {'trained share':>14s}  {'MFU':24s} settings")
    for name, r in results.items():
        print(f"{name:18s} {r['trained_tokens_per_s']:14.1f} {r['tokens_per_s']:10.1f} "
              f"{r['trained_tokens_per_s'] / r['tokens_per_s']:14.0%}  {mfu(r['tokens_per_s'], n_params):24s} {r['note']}")
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "sft_results.json").write_text(json.dumps(results, indent=2))
    print(f"threads: {torch.get_num_threads()}; load average after: {load_text()}")
    rate = {name: r["trained_tokens_per_s"] for name, r in results.items()}
    if "unpacked" in modes:
        print(f"unpacked vs TRL unpacked: {rate['ours unpacked'] / rate['TRL unpacked']:.1f}x")
    best_ours = max((v, k) for k, v in rate.items() if k.startswith("ours"))
    best_trl = max((v, k) for k, v in rate.items() if k.startswith("TRL"))
    print(f"best vs TRL best ({best_ours[1]} vs {best_trl[1]}): {best_ours[0] / best_trl[0]:.1f}x")
    if "packed" in modes:
        every = {name: r["tokens_per_s"] for name, r in results.items()}
        print(f"packed vs TRL packed, all tokens/s: {every['ours packed'] / every['TRL packed']:.1f}x")
        print(f"packed vs TRL packed: {rate['ours packed'] / rate['TRL packed']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
