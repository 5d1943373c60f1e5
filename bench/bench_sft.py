"""Benchmark `pipeline finetune` against TRL's SFTTrainer (completion-only loss): trained tokens/s.

    .venv/bin/python bench/bench_sft.py                    # CPU, fp32, 3 steps per run (slow: minutes)
    .venv/bin/python bench/bench_sft.py --steps 2 --records 64
    .venv/bin/python bench/bench_sft.py --precision bf16   # on a GPU (bench/gpu.sh)

Same model (the embedded SmolLM2-135M-Instruct), the same first `--records` Alpaca records
(../shared/data/alpaca_5000.json; skipped with a message when absent), the same Alpaca prompt
text (TRL gets `prompt` / `completion` pairs built with pipeline.templates), max length 512,
the same batch (`--batch-size` records unpacked, `--packed-batch-size` rows of 512 packed), the
same learning rate and precision. TRL's SFTConfig turns bf16 and gradient checkpointing on by
default, even on CPU: both are set explicitly on both sides (gradient checkpointing off).

Measured: trained (response + EOS) tokens per second over the steps after the first (the
first pays one-off warm-up). Ours counts from its metrics.jsonl; TRL's from a wrapper around
its collator (labels != -100 per batch) and a callback timing each optimizer step. Each run is
a fresh subprocess, so neither inherits the other's warm caches or accelerate's process-wide
state. Prints both modes, the ratios (the goal: ours >= 1.5x TRL packed, with records
isolated), bf16 autocast against fp32 for ours on this device, model FLOPs utilisation on a
GPU, and writes the loss curves side by side to bench/out/sft_loss.png.

On a shared 2-core machine the numbers are noisy (other processes take the cores); compare
ratios from one run, not absolute numbers between runs.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"
OUT = ROOT / "bench" / "out"
LR = 2e-5  # Alpaca's
SEED = 0
# bf16 dense peak of common GPUs, for model FLOPs utilisation (vendor data sheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
# Training FLOPs per token per parameter: forward 2, backward 4 (Kaplan et al. 2020; PaLM app. B).
FLOPS_PER_PARAM_TOKEN = 6


def measured_rate(steps: list[dict]) -> dict:
    """Trained and total tokens/s over the steps after the first (or the only one)."""
    use = steps[1:] or steps
    seconds = sum(s["seconds"] for s in use)
    return {"trained_tokens_per_s": sum(s["trained"] for s in use) / seconds,
            "tokens_per_s": sum(s["tokens"] for s in use) / seconds, "seconds": seconds, "measured_steps": len(use)}


def worker_ours(args, data_path: Path, out_dir: Path) -> dict:
    from pipeline.finetune import Config, run

    stats = run(Config(data=str(data_path), output_dir=str(out_dir), model=args.model_dir, max_steps=args.steps,
                       batch_size=args.batch, packing=args.packing, max_length=args.max_length, lr=LR,
                       val_fraction=0.0, eval_every=0, save_every=0, precision=args.precision, device=args.device,
                       gradient_checkpointing=False, seed=SEED))
    steps = [{"loss": h["loss"], "trained": h["trained_tokens"],
              "seconds": h["trained_tokens"] / h["trained_tokens_per_s"],
              "tokens": h["tokens_per_s"] * h["trained_tokens"] / h["trained_tokens_per_s"]} for h in stats.history]
    return {"steps": steps}


def worker_trl(args, records: list[dict], out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pipeline.templates import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [{"prompt": build_prompt(r, "alpaca", tokenizer), "completion": r["output"]} for r in records]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(out_dir), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine", logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", seed=SEED, dataloader_num_workers=0,
        bf16=args.precision == "bf16", fp16=False, gradient_checkpointing=False,
        use_cpu=args.device == "cpu", packing=args.packing, max_length=args.max_length, completion_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    counts: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        counts.append((int((batch["labels"] != -100).sum()), int(real)))
        return batch

    trainer.data_collator = counting_collator
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(StepTimer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The dataloader fetches one batch ahead, so counts may hold one more than the steps run.
    steps = [{"loss": loss, "trained": c[0], "tokens": c[1], "seconds": t}
             for loss, c, t in zip(losses, counts, times)]
    return {"steps": steps}


def spawn(kind: str, args, packing: bool, precision: str, data_path: Path, work: Path) -> dict:
    result = work / f"{kind}-{'packed' if packing else 'unpacked'}-{precision}.json"
    batch = args.packed_batch_size if packing else args.batch_size
    cmd = [sys.executable, __file__, "--worker", kind, "--result", str(result), "--data-path", str(data_path),
           "--model-dir", args.model_dir, "--steps", str(args.steps), "--batch", str(batch),
           "--max-length", str(args.max_length), "--precision", precision, "--device", args.device,
           "--records", str(args.records)] + (["--packing"] if packing else [])
    label = f"{kind} {'packed' if packing else 'unpacked'} {precision}"
    print(f"running {label} ({args.steps} steps, batch {batch}) ...", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    out.update(measured_rate(out["steps"]), label=label, wall=time.time() - started)
    print(f"  {out['trained_tokens_per_s']:8.1f} trained tokens/s  {out['tokens_per_s']:8.1f} tokens/s  "
          f"(wall {out['wall']:.0f} s)", flush=True)
    return out


def mfu(tokens_per_s: float, n_params: int) -> str:
    import torch

    if not torch.cuda.is_available():
        return "n/a (CPU)"
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return f"n/a (unknown peak for {name})"
    return f"{FLOPS_PER_PARAM_TOKEN * n_params * tokens_per_s / peak:.1%} of {name}'s {peak / 1e12:.0f} TFLOP/s"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("unpacked", "packed") if f"ours-{m}" in results]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for who in ("ours", "trl"):
            r = results.get(f"{who}-{mode}")
            if r:
                ax.plot(range(1, len(r["steps"]) + 1), [s["loss"] for s in r["steps"]], "o-", label=who)
        ax.set_title(f"{mode}: response-token loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="records per batch, unpacked")
    parser.add_argument("--packed-batch-size", type=int, default=2, help="rows of max-length per batch, packed")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="unpacked,packed")
    parser.add_argument("--no-bf16-compare", action="store_true", help="skip ours in bf16 autocast vs fp32")
    parser.add_argument("--model-dir", default=None)
    # worker-only
    parser.add_argument("--worker", choices=("ours", "trl"))
    parser.add_argument("--result")
    parser.add_argument("--data-path")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--packing", action="store_true")
    args = parser.parse_args()

    if args.worker:
        records = [json.loads(line) for line in Path(args.data_path).read_text().splitlines()]
        with tempfile.TemporaryDirectory() as tmp:
            out = (worker_ours(args, Path(args.data_path), Path(tmp) / "run") if args.worker == "ours"
                   else worker_trl(args, records, Path(tmp) / "run"))
        Path(args.result).write_text(json.dumps(out))
        return 0

    if not ALPACA.exists():
        print(f"skipped: {ALPACA} is not here (the benchmark needs real Alpaca records)")
        return 0
    try:
        import trl
    except ImportError:
        print("skipped: TRL is not installed (pip install -e '.[bench]')")
        return 0
    from pipeline.models import embedded_model_dir

    args.model_dir = args.model_dir or str(embedded_model_dir())
    OUT.mkdir(parents=True, exist_ok=True)
    records = json.loads(ALPACA.read_text())[: args.records]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_path = work / "alpaca.jsonl"
        data_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        modes = args.modes.split(",")
        for mode in modes:
            for who in ("ours", "trl"):
                results[f"{who}-{mode}"] = spawn(who, args, mode == "packed", args.precision, data_path, work)
        other = "bf16" if args.precision == "fp32" else "fp32"
        if not args.no_bf16_compare:
            mode = "packed" if "packed" in modes else modes[0]
            results[f"ours-{mode}-{other}"] = spawn("ours", args, mode == "packed", other, data_path, work)

    from safetensors import safe_open

    with safe_open(str(Path(args.model_dir) / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    print(f"\nSmolLM2-135M, first {len(records)} Alpaca records, max length {args.max_length}, {args.precision}, "
          f"{args.device}, {args.steps} steps (rate over steps 2..{args.steps}; noisy on a shared machine)")
    print(f"{'run':28s} {'trained tok/s':>14s} {'all tok/s':>10s}  MFU")
    for key, r in results.items():
        print(f"{r['label']:28s} {r['trained_tokens_per_s']:14.1f} {r['tokens_per_s']:10.1f}  {mfu(r['tokens_per_s'], n_params)}")
    rate = {k: r["trained_tokens_per_s"] for k, r in results.items()}
    print()
    for mode in args.modes.split(","):
        if f"trl-{mode}" in rate:
            print(f"ours / TRL, {mode}: {rate[f'ours-{mode}'] / rate[f'trl-{mode}']:.2f}x")
    if "trl-packed" in rate:
        best = max(v for k, v in rate.items() if k.startswith("ours") and k.count("-") == 1)
        print(f"ours (best mode) / TRL packed: {best / rate['trl-packed']:.2f}x  (goal >= 1.5x)")
    for key in rate:
        if key.count("-") == 2:
            base = key.rsplit("-", 1)[0]
            print(f"ours {key.split('-')[1]}, {key.rsplit('-', 1)[1]} / {args.precision}: {rate[key] / rate[base]:.2f}x")
    plot(results, OUT / "sft_loss.png")
    (OUT / "sft_results.json").write_text(json.dumps(results, indent=2))
    print(f"loss curves: {OUT / 'sft_loss.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
