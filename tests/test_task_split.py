"""finetune's validation split by task (pipeline/task_split.py), and what `--eval-every` logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.batching import split_records
from pipeline.finetune import Config, run
from pipeline.seeds import instance_records, load_seeds
from pipeline.task_split import split_by_task, task_key
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent

# respond's K instances of one instruction, the same instruction with another input, and chat records.
RECORDS = ([{"instruction": f"Task {t}: answer briefly.", "input": f"case {k}", "output": f"answer {t}.{k}"}
            for t in range(10) for k in range(3)]
           + [{"instruction": "次の文を英語に翻訳してください。", "input": text, "output": out}
              for text, out in (("猫が好きです。", "I like cats."), ("犬が好きです。", "I like dogs."))]
           + [{"messages": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "こんにちは！"}]},
              {"messages": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "どうも。"}]}])


def test_no_task_falls_on_both_sides():
    train, val = split_by_task(RECORDS, 0.2, seed=3)
    assert len(train) + len(val) == len(RECORDS) and val
    assert not {task_key(r) for r in train} & {task_key(r) for r in val}
    assert abs(len(val) - 0.2 * len(RECORDS)) <= 3  # whole tasks of three: within one task of the share
    assert split_by_task(RECORDS, 0.2, seed=3) == (train, val) and split_by_task(RECORDS, 0.2, seed=4) != (train, val)
    # The record split it replaces puts most of these tasks on both sides.
    record_train, record_val = split_records(RECORDS, 0.2, seed=3)
    assert {task_key(r) for r in record_train} & {task_key(r) for r in record_val}


def test_seed_instances_are_one_task_by_task_id_and_edge_shares():
    records = instance_records(load_seeds(ROOT / "seeds" / "seed_tasks.jsonl"))
    train, val = split_by_task(records, 0.1, seed=0)
    assert not {r["task_id"] for r in train} & {r["task_id"] for r in val}
    assert split_by_task(RECORDS, 0.0, seed=0) == (RECORDS, [])
    two = RECORDS[:3] + RECORDS[30:32]  # two tasks: one each side, whatever the share
    for share in (0.01, 0.99):
        train, val = split_by_task(two, share, seed=0)
        assert len({task_key(r) for r in train}) == len({task_key(r) for r in val}) == 1


def test_finetune_holds_out_tasks_by_default_and_logs_validation(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:30])
    cfg = Config(data=str(data), output_dir=str(tmp_path / "run"), val_fraction=0.2, eval_every=2, save_every=0, max_steps=4,
                 batch_size=4, lr=1e-2, lr_schedule="constant", device="cpu", seed=0, template="alpaca", eval_generate=2)
    run(cfg)
    val = [json.loads(line) for line in (tmp_path / "run" / "val.jsonl").read_text(encoding="utf-8").splitlines()]
    trained = {r["instruction"] for r in RECORDS[:30]} - {r["instruction"] for r in val}
    assert val and not {r["instruction"] for r in val} & trained
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    validated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in validated] == [2, 4]
    assert all(r["val_loss"] > 0 and 0 <= r["val_token_accuracy"] <= 1 for r in validated)
    assert "val_token_accuracy" not in rows[0]  # logged only where validation ran
    # --eval-generate 2: greedy answers to two validation records, scored as eval scores them.
    assert all(0 <= r["val_rouge_l"] <= 1 and 0 <= r["val_exact_match"] <= 1 and r["val_generated"] == 2 for r in validated)
    # loss.png draws the validation points where they were logged.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.plots import draw_loss

    fig, ax = plt.subplots()
    draw_loss(ax, rows)
    line = next(line for line in ax.get_lines() if line.get_label() == "validation loss")
    assert list(line.get_xdata()) == [2, 4] and list(line.get_ydata()) == [r["val_loss"] for r in validated]
    plt.close(fig)
    assert (tmp_path / "run" / "loss.png").exists()



def test_val_split_records_keeps_the_record_split(tiny_model_dir, tmp_path):
    from pipeline.finetune import prepare_data
    from pipeline.models import load_tokenizer

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:30])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = Config(data=str(data), val_fraction=0.2, val_split="records", seed=0, template="alpaca")
    assert prepare_data(cfg, RECORDS[:30], tokenizer).val_records == split_records(RECORDS[:30], 0.2, 0)[1]  # as before
    by_task = prepare_data(Config(**{**cfg.__dict__, "val_split": "tasks"}), RECORDS[:30], tokenizer).val_records
    assert by_task == split_by_task(RECORDS[:30], 0.2, 0)[1]
