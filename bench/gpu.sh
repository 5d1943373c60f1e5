#!/usr/bin/env bash
# The SFT benchmark on a CUDA machine, in bf16, in under 5 minutes:
#   bash bench/gpu.sh            # uses .venv if it has CUDA torch, else runs `make setup TORCH=torch`
# Prints trained tokens/s of ours against TRL's SFTTrainer (packed and unpacked), all tokens/s,
# and model FLOPs utilisation (6 x parameters x tokens/s against the GPU's bf16 peak).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS="${STEPS:-20}"        # enough steps past warm-up for a stable rate; each is well under a second on a GPU
RECORDS="${RECORDS:-256}"
LIMIT_S="${LIMIT_S:-290}"   # stay inside the 5-minute budget, set-up excluded

if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA torch in .venv: installing (make setup TORCH=torch)"
    rm -f .venv/.setup-stamp
    make setup TORCH=torch
fi
.venv/bin/python -c "import trl" 2>/dev/null || .venv/bin/python -m pip install -q -e '.[bench]'
.venv/bin/python - <<'PY'
import torch
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
# Batch: 8 records unpacked, 8 rows of 512 packed (a GPU has room; both sides get the same).
timeout "$LIMIT_S" .venv/bin/python bench/bench_sft.py --device cuda --precision bf16 --steps "$STEPS" \
    --records "$RECORDS" --batch-size 8 --packed-batch-size 8
