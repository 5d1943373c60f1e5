"""Benchmark `pipeline dpo` against TRL's DPOTrainer: trained (answer) tokens per second, one process.

    .venv/bin/python bench/bench_dpo.py                          # 2 threads, batch 8, 4 steps each (minutes)
    .venv/bin/python bench/bench_dpo.py --steps 3 --batch-size 4 --max-length 256   # quicker, on a busy machine
    .venv/bin/python bench/bench_dpo.py --device cuda --precision bf16 --steps 20   # bench/gpu.sh

The same model (the embedded SmolLM2-135M-Instruct), the same pairs, the same batch (pairs per
step), the same max length, the same precision (`--precision`: fp32 by default; bf16 as torch
autocast around both trainers, reference pass included, weights and Adam state fp32), sigmoid
DPO with beta 0.1 and the same learning rate. Pairs come from ../shared/data/alpaca_5000.json (skipped with a message when absent):
the prompt is the record's Alpaca prompt, `chosen` its reference output, `rejected` the output
of a record half the file away (a fluent answer to another question). Only pairs whose tokens
TRL and we split identically are kept (TRL tokenizes prompt + answer as one string; we join
the ids of each, `pipeline.templates`), and whose answers fit in --max-length, so both train
on exactly the same token ids.

TRL at its best CPU settings: reference log-probabilities precomputed before training
(`precompute_ref_log_probs=True`, one model in memory like ours), its fused log-prob LM head
(on by default in 1.16), no gradient checkpointing, its bf16 flag off (autocast is set from
outside, as for ours: accelerate's precision state is process-wide).
Its `padding_free` is disabled in TRL 1.16 (it warns and falls back to padding), so it pads.

Measured: answer tokens trained per second over the steps after the first (the first pays
one-off warm-up); both reference passes are outside the timed steps. The first-step loss of
both must be log 2 (the policy is its own reference at step 0) and equal to ~1e-3 (1e-2 in
bf16): a check that both trained on the same data. On a GPU it prints model FLOPs utilisation
(6 x parameters x all tokens/s against the GPU's bf16 peak). Prints the threads and the load average before and after (on a
shared machine the ratio is only meaningful when the load is below the thread count), and LAST
the line `dpo vs TRL DPOTrainer: N.Nx`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sft import count_parameters, mfu, synchronize  # noqa: E402  (one definition of MFU for both)

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"
LR = 1e-6  # DPO's (Rafailov et al. 2023) and TRL's default
SEED = 0
FIRST_LOSS_TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2}  # bf16 rounds the two sides' sums differently


def build_pairs(records: list[dict], count: int, tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Pairs both trainers tokenize identically and that fit; (pairs, how many candidates were left out)."""
    from pipeline.preferences import make_pair, training_records
    from pipeline.templates import encode_example

    usable = [r for r in records if r.get("output", "").strip()]
    half = len(usable) // 2
    pairs, skipped = [], 0
    for i, record in enumerate(usable):
        if len(pairs) == count:
            break
        other = usable[(i + half) % len(usable)]["output"]
        if other == record["output"]:
            skipped += 1
            continue
        pair = make_pair(f"pair-{i}", record["instruction"], record.get("input", ""), record["output"], other)
        ours = [encode_example(r, tokenizer, "alpaca", max_length + 1) for r in training_records(pair)]
        # TRL's ids: prompt + answer + EOS text tokenized as one string.
        theirs = [tokenizer(pair["prompt"] + pair[name] + tokenizer.eos_token).input_ids for name in ("chosen", "rejected")]
        if any(len(e.input_ids) > max_length or e.input_ids != t for e, t in zip(ours, theirs)):
            skipped += 1
            continue
        pairs.append(pair)
    return pairs, skipped


def run_ours(args, data_path: Path, out_dir: Path) -> dict:
    from pipeline.dpo import REFERENCE_FILE, Config, run

    stats = run(Config(data=str(data_path), output_dir=str(out_dir), model=args.model_dir, max_steps=args.steps,
                       batch_size=args.batch_size, max_length=args.max_length, lr=LR, lr_schedule="linear",
                       warmup_ratio=0.0, save_every=0, precision=args.precision, device=args.device, seed=SEED,
                       packing=not args.no_packing))
    steps = []
    for h in stats.history:
        seconds = h["trained_tokens"] / h["trained_tokens_per_s"]
        steps.append({"loss": h["loss"], "trained": h["trained_tokens"], "seconds": seconds,
                      "tokens": h["tokens_per_s"] * seconds})
    reference = json.loads((out_dir / REFERENCE_FILE).read_text(encoding="utf-8"))["logps"]
    return {"steps": steps, "reference": reference}


def run_trl(args, pairs: list[dict], out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(out_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, beta=0.1,
        loss_type=["sigmoid"], max_length=args.max_length, precompute_ref_log_probs=True, padding_free=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=SEED, dataloader_num_workers=0,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=args.device == "cpu")
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    autocast = torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")
    with autocast:  # the reference pass runs in the constructor: the same precision as training
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    counts: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        # completion_mask marks answer + EOS tokens; position 0 is never a target.
        counts.append((int(batch["completion_mask"][:, 1:].sum()), int(batch["attention_mask"].sum())))
        return batch

    trainer.data_collator = counting_collator
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            synchronize()
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(StepTimer())
    with autocast:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The reference pass ran in DPOTrainer's constructor, before the counting collator was in place;
    # the dataloader may fetch one batch more than the steps run.
    reference = [list(r) for r in zip(trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"])]
    return {"steps": [{"loss": loss, "trained": c, "tokens": n, "seconds": t}
                      for loss, (c, n), t in zip(losses, counts, times)], "reference": reference}


def rate(steps: list[dict], units: str = "trained") -> float:
    use = steps[1:] or steps
    return sum(s[units] for s in use) / sum(s["seconds"] for s in use)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="pairs built (default: batch size x steps, each used once)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step, both trainers")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the goal is stated for 2 cores)")
    parser.add_argument("--no-packing", action="store_true", help="ours with padded rows instead of packed ones")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="for both sides")
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args()
    if not ALPACA.exists():
        print(f"skipped: {ALPACA} is not here (the benchmark needs real Alpaca records)")
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("skipped: TRL is not installed (pip install -e '.[dev]')")
        return 0
    import torch
    from transformers import AutoTokenizer

    from pipeline.models import embedded_model_dir

    torch.set_num_threads(args.threads)
    args.model_dir = args.model_dir or str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    args.pairs = args.pairs or args.batch_size * args.steps
    pairs, skipped = build_pairs(json.loads(ALPACA.read_text(encoding="utf-8")), args.pairs, tokenizer, args.max_length)
    print(f"threads: {torch.get_num_threads()}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"{len(pairs)} pairs ({skipped} candidates left out: tokenized differently by TRL, or longer than "
          f"{args.max_length}); batch {args.batch_size} pairs, {args.steps} steps each, {args.precision}, {args.device}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "pairs.jsonl"
        data_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        started = time.time()
        ours = run_ours(args, data_path, Path(tmp) / "ours")
        ours_wall = time.time() - started
        started = time.time()
        theirs = run_trl(args, pairs, Path(tmp) / "trl")
        trl_wall = time.time() - started
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    first_ours, first_trl = ours["steps"][0]["loss"], theirs["steps"][0]["loss"]
    tolerance = FIRST_LOSS_TOLERANCE[args.precision]
    equal = abs(first_ours - first_trl) <= tolerance
    print(f"first-step loss: ours {first_ours:.6f}, TRL {first_trl:.6f} ({'equal' if equal else 'DIFFERENT'} to "
          f"{tolerance:g}; log 2 = 0.693147)")
    # The same summed log-probability of every answer on both sides: the same tokens, the same masking.
    gaps = [abs(a - b) for x, y in zip(ours["reference"], theirs["reference"]) for a, b in zip(x, y)]
    print(f"reference log-probs of {len(gaps) // 2} pairs: largest difference ours vs TRL {max(gaps):.2e} "
          f"(pairs: ours {len(ours['reference'])}, TRL {len(theirs['reference'])})", flush=True)
    ours_rate, trl_rate = rate(ours["steps"]), rate(theirs["steps"])
    print(f"trained tokens/s (steps 2..{args.steps}): ours {ours_rate:.1f} (wall {ours_wall:.0f} s with loading and "
          f"reference pass), TRL {trl_rate:.1f} (wall {trl_wall:.0f} s)")
    n_params = count_parameters(args.model_dir)
    print(f"model FLOPs utilisation (all tokens): ours {mfu(rate(ours['steps'], 'tokens'), n_params)}, "
          f"TRL {mfu(rate(theirs['steps'], 'tokens'), n_params)}")
    print(f"dpo vs TRL DPOTrainer: {ours_rate / trl_rate:.1f}x", flush=True)
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
