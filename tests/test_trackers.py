"""`--report-to`: finetune's metrics through accelerate's trackers; tensorboard's event files read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import finetune
from pipeline.training import TRACKER_DIR
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "挨拶してください。", "input": "", "output": "こんにちは"},
    {"instruction": "Count to three.", "input": "", "output": "1 2 3"},
    {"instruction": "色を一つ挙げてください。", "input": "", "output": "青"},
]


def test_tensorboard_events_hold_the_logged_losses(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "run"
    finetune.run(finetune.Config(data=str(data), output_dir=str(out), model=str(tiny_model_dir), max_steps=3,
                                 batch_size=2, val_fraction=0.0, eval_every=0, save_every=0, device="cpu", lr=1e-3,
                                 report_to="tensorboard"))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert list((out / TRACKER_DIR / "finetune").glob("events.out.tfevents.*")), "no event file"
    scalars = read_scalars(out / TRACKER_DIR)
    assert [e.step for e in scalars["loss"]] == [1, 2, 3]
    assert [e.value for e in scalars["loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert [e.value for e in scalars["lr"]] == pytest.approx([h["lr"] for h in history], rel=1e-6)


def test_no_tracker_by_default_writes_no_logs(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "run"
    finetune.run(finetune.Config(data=str(data), output_dir=str(out), model=str(tiny_model_dir), max_steps=1,
                                 batch_size=2, val_fraction=0.0, eval_every=0, save_every=0, device="cpu"))
    assert not (out / TRACKER_DIR).exists()


def test_wandb_without_the_package_is_one_line(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    # A `wandb` that cannot be imported stands first on the path, whether or not the real one is installed.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "wandb.py").write_text("raise ImportError('no wandb here')\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "pipeline", "finetune", "--data", str(data), "--output-dir",
                             str(tmp_path / "run"), "--model", str(tiny_model_dir), "--report-to", "wandb",
                             "--device", "cpu", "--max-steps", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("error: --report-to wandb: wandb is not installed (pip install wandb); "
                         "--report-to tensorboard works offline")
    assert "Traceback" not in result.stderr


def test_report_to_takes_only_known_trackers():
    result = subprocess.run([sys.executable, "-m", "pipeline", "finetune", "--report-to", "mlflow"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'mlflow'" in result.stderr


def read_scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list] = {}
    for event_file in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(accumulator.Scalars(tag))
    return scalars


def test_dpo_reports_to_tensorboard_and_writes_a_model_card(tiny_model_dir, tmp_path):
    from huggingface_hub import ModelCard

    from pipeline import dpo
    from pipeline.preferences import make_pair

    pairs = [make_pair("p0", "日本の首都はどこですか。", "", "東京です。", "大阪です。"),
             make_pair("p1", "Name a colour.", "", "Blue.", "I cannot."),
             make_pair("p2", "Add the numbers.", "2 and 3", "5", "23")]
    data = write_jsonl(tmp_path / "preferences.jsonl", pairs)
    out = tmp_path / "dpo"
    dpo.run(dpo.Config(data=str(data), output_dir=str(out), model=str(tiny_model_dir), batch_size=3, max_steps=2,
                       save_every=0, device="cpu", precision="fp32", lr=1e-3, report_to="tensorboard"))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    scalars = read_scalars(out / TRACKER_DIR)
    assert [e.step for e in scalars["loss"]] == [1, 2]
    assert [e.value for e in scalars["loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(tiny_model_dir) and card.data.library_name == "transformers"
    assert "dpo" in card.data.tags and sorted(card.data.language) == ["en", "ja"]
    assert "| preference pair | 3 |" in card.text
