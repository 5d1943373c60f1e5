"""Benchmark `pipeline finetune` against TRL's SFTTrainer at its best: trained tokens/s, one process.

    .venv/bin/python bench/bench_sft.py                          # CPU, packed and unpacked (~5 min on 2 cores)
    .venv/bin/python bench/bench_sft.py --modes packed --records 64   # quicker
    .venv/bin/python bench/bench_sft.py --device cuda --records 512 --packed-batch-size 8   # bench/gpu.sh

Same model (the embedded SmolLM2-135M-Instruct), the same Alpaca records (the first `--records`
of ../shared/data/alpaca_5000.json whose prompt + response fit in `--max-length`, so neither
side truncates; skipped with a message when the file is absent), the same Alpaca prompt text
(TRL gets `prompt` / `completion` pairs built with pipeline.templates), the same tokens per step
(`--packed-batch-size` rows of max length packed; `--batch-size` records unpacked), the same
learning rate, fp32 weights and Adam state on both sides, and the same precision: bf16 as torch
autocast on both sides, or fp32.

Each side trains ONE EPOCH over the records (`--steps` can cut it short), so both train the
same response tokens in all and the ratio is not the luck of which rows a few steps drew (a
packed row's trained share varies from 30% to 60%). Before the timed epoch each side runs
forward and backward, without an update, on the same batch (our first micro-batch, given to TRL
through its own padding-free collator): that warms both up and prints both losses on identical
tokens, which must agree (to ~1e-2 in bf16, ~1e-4 in fp32): the same loss (mean cross-entropy
per response token) and records isolated on both sides (leaking attention would change it).

Best settings, measured on a 2-core AMD EPYC Zen 4 (AVX-512 BF16, no AMX), 1 thread, one step
of 2 packed rows of 512 under torch.profiler:
- precision: bf16 autocast is best for both (TRL 12.1 s against 17.7 s in fp32; ours 4.3 s
  against 11.8 s). `--precision auto` picks bf16 where the CPU has bf16 matmul units (AVX-512
  BF16 or AMX) or on a GPU, fp32 on other CPUs (emulated bf16 is slower there).
- TRL (trl >= 1.16), packed: `packing=True` with best-fit-decreasing packing, which TRL runs
  padding-free (the batch flattened into one sequence, records told apart by `position_ids`,
  isolated by the block-diagonal mask transformers builds from them); unpacked:
  `padding_free=True` (no padding, so length grouping has nothing left to save); both with
  completion-only loss, its fused LM head (chunked log-probs, never the full logits), fused
  AdamW (transformers' default), no gradient checkpointing.
- ours: the LM head and cross-entropy on labelled (response) positions only, where TRL's fused
  head scores every position on a CPU (it keeps only the labelled ones on Triton devices); one
  causal SDPA call per packed record in fp32 inside bf16 autocast (pipeline.packed_attention),
  where TRL runs one masked call over the whole flattened batch; fused AdamW.

Measured here (`bench_sft.py --records 64`, what `make bench` runs: bf16, 1 thread picked by
free_cores under a load average of 2.3-3.7 on 2 cores, 4 min 11 s): packed 103.9 against TRL
packed 51.8 trained tokens/s (2.0x), unpacked 91.2 against 64.1 (1.4x), best against best
1.6x; same-batch losses 2.4816 against 2.4796. With `--modes packed --records 96`: 2.2x.

Both trainers run in this one process, their steps interleaved (ours, TRL, TRL, ours, ...), so a
machine loaded by other work slows both alike. Each step is timed from taking the batch (our
collate, TRL's collator) to the optimizer step. Measured: trained (response + EOS) tokens per
second over the epoch. Prints the torch threads and the load average before and after, model
FLOPs utilisation on a GPU, and LAST the line `packed vs TRL packed: N.Nx`.
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
        cfg = Config(data=str(data_path), output_dir=str(out_dir), model=args.model_dir, epochs=1,
                     max_steps=args.steps or -1, batch_size=batch, packing=packing, max_length=args.max_length, lr=LR,
                     lr_schedule="cosine", val_fraction=0.0, eval_every=0, save_every=0, precision=args.precision,
                     device=args.device, gradient_checkpointing=False, seed=SEED)
        records = load_training_records(cfg.data, cfg.template)
        cfg = resolve_template(cfg, records)
        self.session = prepare(cfg, records, out_dir, None)
        self.units = trained_tokens
        self.steps = self.session.total_steps
        self.session.trainer.module.train()
        self.note = f"batch {batch}, " + (f"packed ({self.session.packing_mode})" if packing else "length-grouped")

    def shared_batch(self) -> list[list]:
        """Our first micro-batch: rows of encoded records (what both sides warm up on)."""
        s = self.session
        return [[s.batches.train[i] for i in row] for row in s.batches.epoch_plan(0)[0]]

    def warm_up(self, rows: list[list]) -> float:
        """Forward and backward on `rows` without an update; the mean loss per trained token."""
        from pipeline.batching import collate

        s = self.session
        examples = [e for row in rows for e in row]
        plan, at = [], 0
        for row in rows:
            plan.append(list(range(at, at + len(row))))
            at += len(row)
        batch = collate(plan, examples, s.tokenizer.pad_token_id, s.batches.block_mask)
        with s.trainer.autocast():
            loss_sum, _, units = s.trainer.module(**s.trainer.to_device(batch))
        s.trainer.accelerator.backward(loss_sum / units)
        s.trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum.detach()) / int(units)

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
            output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=batch,
            gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine", logging_steps=1,
            save_strategy="no", eval_strategy="no", report_to="none", seed=SEED, dataloader_num_workers=0,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=args.device == "cpu",
            packing=packing, padding_free=True, completion_only_loss=True,
            # Unpacked padding-free refuses a max length (it would not enforce it): the records were
            # chosen to fit in --max-length, so nothing would be cut anyway.
            max_length=args.max_length if packing else None,
        )
        self.trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        loader = self.trainer.get_train_dataloader()
        self.steps = min(len(loader), args.steps) if args.steps else len(loader)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=self.steps)
        self.loader = iter(loader)
        # Autocast here rather than SFTConfig(bf16=True), whose accelerate state is process-wide (see
        # pipeline.training.make_accelerator): the same torch autocast either way.
        self.autocast = torch.autocast(device_type=self.trainer.args.device.type, dtype=torch.bfloat16,
                                       enabled=args.precision == "bf16")
        self.note = f"batch {batch}, " + ("packed (BFD, padding-free)" if packing else "padding-free")

    def warm_up(self, rows: list[list]) -> float:
        """Forward and backward on `rows` (through TRL's collator and loss) without an update; the mean loss."""
        t = self.trainer
        inputs = t._prepare_inputs(t.data_collator([{"input_ids": e.input_ids, "labels": e.labels} for row in rows
                                                    for e in row]))
        with self.autocast:
            loss = t.compute_loss(t.model, inputs)
        loss.backward()
        t.model.zero_grad(set_to_none=True)
        return float(loss.detach())

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


def warm_up(runners: dict) -> dict[str, float]:
    """Each runner's loss on the same batch (our first), forward and backward, no update."""
    rows = next(iter(runners.values())).shared_batch()
    return {name: runner.warm_up(rows) for name, runner in runners.items()}


def run_interleaved(runners: dict) -> dict[str, dict]:
    """Step every runner through its epoch, alternating the order each step; per-run rates over all steps."""
    log: dict[str, list] = {name: [] for name in runners}
    names = list(runners)
    for i in range(max(r.steps for r in runners.values())):
        for name in (names if i % 2 == 0 else names[::-1]):
            if i >= runners[name].steps:
                continue
            synchronize()
            started = time.perf_counter()
            units, tokens, loss = runners[name].step(i)
            synchronize()
            log[name].append({"seconds": time.perf_counter() - started, "trained": units, "tokens": tokens, "loss": loss})
        print(f"  step {i + 1}: " + ", ".join(f"{n} {log[n][-1]['seconds']:.1f} s" for n in names if len(log[n]) > i),
              flush=True)
    out = {}
    for name, rows in log.items():
        seconds = sum(r["seconds"] for r in rows)
        out[name] = {"trained_tokens_per_s": sum(r["trained"] for r in rows) / seconds,
                     "tokens_per_s": sum(r["tokens"] for r in rows) / seconds, "steps": rows,
                     "trained": sum(r["trained"] for r in rows), "seconds": seconds, "note": runners[name].note}
    return out


def count_parameters(model_dir: str) -> int:
    """The model's parameters, read from its safetensors header (no weights loaded)."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


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
    parser.add_argument("--records", type=int, default=96, help="Alpaca records that fit in --max-length: one epoch "
                        "of them is timed (96: ~11k tokens, 11 packed steps a side)")
    parser.add_argument("--steps", type=int, default=0, help="cut each epoch to this many steps (0: the whole epoch)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="records per step, unpacked")
    parser.add_argument("--packed-batch-size", type=int, default=2, help="rows of --max-length per step, packed")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="for both sides; auto: bf16 on a GPU or a CPU with bf16 matmul units, else fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="unpacked,packed", help="comma-separated: unpacked, packed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores, "
                        "pipeline.models.free_cores: OMP_NUM_THREADS when set)")
    parser.add_argument("--model-dir", default=None)
    return parser.parse_args()


def best_precision(device: str) -> str:
    """bf16 where it was measured faster for both sides (GPUs; CPUs with AVX-512 BF16 or AMX), else fp32."""
    import torch

    from pipeline.models import cpu_has_bf16_matmul

    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device == "cpu" and cpu_has_bf16_matmul() else "fp32"


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
    if args.precision == "auto":
        args.precision = best_precision(args.device)
    print(f"threads: {torch.get_num_threads()}; precision: {args.precision} (both sides); "
          f"load average before: {load_text()}", flush=True)
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
            same = warm_up(runners)
            print("  same batch, loss before training: " + ", ".join(f"{n} {v:.4f}" for n, v in same.items()), flush=True)
            results.update(run_interleaved(runners))
            for name, loss in same.items():
                results[name]["same_batch_loss"] = loss
            del runners
    print(f"\nSmolLM2-135M, {len(records)} Alpaca records that fit in {args.max_length} tokens ({skipped} longer passed "
          f"over), {args.precision}, {args.device}, one epoch each" + (f" cut to {args.steps} steps" if args.steps else ""))
    report(results, args, modes)
    return 0


def report(results: dict[str, dict], args, modes: list[str]) -> None:
    """The table, the results file and the ratio lines, the packed one last."""
    import torch

    n_params = count_parameters(args.model_dir)
    print(f"{'run':16s} {'trained tok/s':>13s} {'all tok/s':>10s} {'trained':>8s} {'steps':>5s} {'same-batch':>10s} "
          f"{'step-1':>7s}  {'MFU':22s} settings")
    for name, r in results.items():
        print(f"{name:16s} {r['trained_tokens_per_s']:13.1f} {r['tokens_per_s']:10.1f} {r['trained']:8d} "
              f"{len(r['steps']):5d} {r['same_batch_loss']:10.4f} {r['steps'][0]['loss']:7.4f}  "
              f"{mfu(r['tokens_per_s'], n_params):22s} {r['note']}")
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


if __name__ == "__main__":
    raise SystemExit(main())
