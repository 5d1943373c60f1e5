"""FSDP through configs/fsdp.yaml: on CPU it is refused in one line rather than silently run as DDP.

torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo, but accelerate (which `pipeline
finetune` and `dpo` train through) applies an FSDP config only on GPU-like devices: a CPU launch
becomes plain DDP (distributed type MULTI_CPU). The equality of an FSDP run with a single
process is checked on a GPU by bench/gpu.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "日本の首都はどこですか。", "output": "東京です。"},
    {"instruction": "Say hello in French.", "output": "Bonjour !"},
    {"instruction": "Give an antonym.", "input": "hot", "output": "cold"},
]


def test_fsdp_environment_on_cpu_is_a_user_error(monkeypatch):
    from pipeline.training import ACCELERATE_FSDP_ENV, make_accelerator

    monkeypatch.setenv(ACCELERATE_FSDP_ENV, "true")
    with pytest.raises(UserError, match=r"FSDP \(configs/fsdp.yaml\): accelerate applies it only on GPUs; on cpu"):
        make_accelerator("cpu", "fp32")


def test_no_fsdp_environment_trains_as_before(monkeypatch):
    from pipeline.training import ACCELERATE_FSDP_ENV, make_accelerator

    monkeypatch.delenv(ACCELERATE_FSDP_ENV, raising=False)
    accelerator, precision = make_accelerator("cpu", "fp32")
    assert (accelerator.distributed_type.name, precision) == ("NO", "fp32")


@pytest.mark.slow
def test_fsdp_config_launch_on_cpu_is_refused_not_run_as_ddp(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "fsdp"
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(ROOT / "configs" / "fsdp.yaml"), "--num_processes", "2",
         "-m", "pipeline", "finetune", "--data", str(data), "--model", str(tiny_model_dir), "--output-dir", str(out),
         "--epochs", "1", "--batch-size", "2", "--val-fraction", "0", "--device", "cpu", "--seed", "0"],
        capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode != 0, "an FSDP launch on CPU ran (as DDP) instead of being refused"
    assert "FSDP (configs/fsdp.yaml): accelerate applies it only on GPUs; on cpu" in result.stderr
    assert "would silently run as MULTI_CPU" in result.stderr
    # Refused before anything is written: no model, no train_config.json claiming a distributed type.
    assert not (out / "model.safetensors").exists() and not (out / "train_config.json").exists()
