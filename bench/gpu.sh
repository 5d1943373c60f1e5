#!/usr/bin/env bash
# The SFT and DPO benchmarks on one CUDA GPU in bf16, and the FSDP check, in under 5 minutes:
#   bash bench/gpu.sh            # uses .venv if it has CUDA torch, else runs `make setup TORCH=torch`
# 1. bench/bench_sft.py: ours against TRL's SFTTrainer at its best (packed and padding-free),
#    trained tokens/s, all tokens/s and model FLOPs utilisation (6 x parameters x tokens/s against
#    the GPU's bf16 peak); last line `packed vs TRL packed: N.Nx`.
# 2. bench/bench_dpo.py: ours against TRL's DPOTrainer, trained tokens/s and MFU.
# 3. FSDP: accelerate runs configs/fsdp.yaml only on GPUs (on CPU it would be DDP, so `pipeline
#    finetune` refuses it there; tests/test_fsdp.py). Here FSDP trains on min(2, GPUs) processes
#    and must give the weights of one process accumulating the same micro-batches.
# Each part has its own time limit (LIMIT_S in all, set-up excluded); a part that fails is
# reported and the others still run; the exit status is non-zero when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS="${STEPS:-20}"        # DPO steps: enough past warm-up for a stable rate; each is well under a second on a GPU
RECORDS="${RECORDS:-512}"
SFT_LIMIT_S="${SFT_LIMIT_S:-120}"
DPO_LIMIT_S="${DPO_LIMIT_S:-90}"
FSDP_LIMIT_S="${FSDP_LIMIT_S:-80}"  # the three add up to 290 s: inside the 5 minutes
FSDP_ATOL="${FSDP_ATOL:-1e-4}"      # fp32; a sharded reduction sums in another order than one process
PY=.venv/bin/python
failed=()

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA torch in .venv: installing (make setup TORCH=torch)"
    rm -f .venv/.setup-stamp
    make setup TORCH=torch || exit 1
fi
$PY -c "import trl" 2>/dev/null || $PY -m pip install -q -e '.[bench]' || exit 1
$PY - <<'PY'
import os, torch
print(f"GPU: {torch.cuda.get_device_name()} (x{torch.cuda.device_count()}), torch {torch.__version__}, "
      f"bf16: {torch.cuda.is_bf16_supported()}, load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
PY

echo "== SFT: ours vs TRL SFTTrainer, bf16 =="
# One epoch of $RECORDS records a side (~70k tokens: ~9 packed steps, ~64 unpacked); batch: 8
# records unpacked, 8 rows of 512 packed (a GPU has room; both sides get the same).
timeout "$SFT_LIMIT_S" $PY bench/bench_sft.py --device cuda --precision bf16 \
    --records "$RECORDS" --batch-size 8 --packed-batch-size 8 || failed+=("bench_sft.py")

echo "== DPO: ours vs TRL DPOTrainer, bf16 =="
timeout "$DPO_LIMIT_S" $PY bench/bench_dpo.py --device cuda --precision bf16 --steps "$STEPS" --batch-size 8 \
    || failed+=("bench_dpo.py")

echo "== FSDP (configs/fsdp.yaml) against one process =="
fsdp_check() {
    local work nproc
    work="$(mktemp -d)"
    nproc=$($PY -c "import torch; print(min(2, torch.cuda.device_count()))")
    $PY - "$work" <<'PY' || return 1
import json, sys
from pathlib import Path
alpaca = Path("..") / "shared" / "data" / "alpaca_5000.json"
records = json.loads(alpaca.read_text())[:32] if alpaca.exists() else [
    {"instruction": "Name a colour.", "output": "Blue."}, {"instruction": "日本の首都は？", "output": "東京です。"}] * 16
Path(sys.argv[1], "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
PY
    # fp32, so the comparison measures sharding, not bf16 rounding; 4 records per micro-batch.
    local common=(--data "$work/train.jsonl" --epochs 1 --max-steps 3 --batch-size 4 --val-fraction 0
                  --eval-every 0 --save-every 0 --lr 1e-4 --lr-schedule constant --precision fp32 --seed 0)
    .venv/bin/accelerate launch --config_file configs/fsdp.yaml --num_processes "$nproc" -m pipeline finetune \
        "${common[@]}" --output-dir "$work/fsdp" --device cuda || return 1
    $PY -m pipeline finetune "${common[@]}" --grad-accum "$nproc" --output-dir "$work/one" --device cuda || return 1
    $PY - "$work" "$nproc" "$FSDP_ATOL" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
work, nproc, atol = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
config = json.loads((work / "fsdp" / "train_config.json").read_text())
assert config["distributed"] == "FSDP" and config["processes"] == nproc, config
fsdp, one = load_file(work / "fsdp" / "model.safetensors"), load_file(work / "one" / "model.safetensors")
assert fsdp.keys() == one.keys(), sorted(fsdp.keys() ^ one.keys())
worst = max(((fsdp[k].float() - one[k].float()).abs().max().item(), k) for k in one)
print(f"FSDP ({nproc} process(es)) vs one process accumulating {nproc}: largest weight difference {worst[0]:.2e} ({worst[1]})")
sys.exit(0 if worst[0] <= atol else f"FSDP differs from one process by more than {atol}")
PY
}
export -f fsdp_check
export PY FSDP_ATOL
timeout "$FSDP_LIMIT_S" bash -c fsdp_check || failed+=("FSDP check")

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
