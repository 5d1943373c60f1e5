"""The eval stage end to end: `--predictions` through the CLI, a tiny model with a baseline, and
the batched paths against one-record-at-a-time runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from pipeline import eval as ev
from pipeline.cli import main
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
METRIC_KEYS = {"loss", "perplexity", "token_accuracy", "exact_match", "bleu", "rouge_l"}

PREDICTION_RECORDS = [
    {"instruction": "Name the capital.", "output": "Paris is the capital of France.", "prediction": "Paris is the capital of France."},
    {"instruction": "Boiling point?", "output": "Water boils at 100 degrees Celsius.", "prediction": "At sea level water boils at 100 degrees.",
     "baseline_prediction": "It is hot."},
    {"instruction": "Count.", "output": "1, 2, 3", "prediction": " 1, 2,\n 3 "},
]
DATA_RECORDS = [
    {"id": "a", "instruction": "Say hello.", "input": "", "output": "Hello there!"},
    {"id": "b", "instruction": "日本語に翻訳してください。", "input": "I like cats.", "output": "私は猫が好きです。"},
    {"id": "c", "instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"id": "d", "instruction": "Never scored: past --limit.", "output": "x"},
]


def test_predictions_through_the_cli_match_sacrebleu_and_rouge_score(tmp_path):
    records = [{k: v for k, v in r.items() if k != "baseline_prediction"} for r in PREDICTION_RECORDS]
    preds_file = write_jsonl(tmp_path / "f.jsonl", records)
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--predictions", str(preds_file), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    preds, refs = [r["prediction"] for r in records], [r["output"] for r in records]
    metrics = result["metrics"]
    assert set(metrics) == {"exact_match", "bleu", "rouge_l"}  # loss & co. do not apply: absent, not 0
    assert "baseline" not in result
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert metrics["rouge_l"] == pytest.approx(sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 3)
    assert metrics["exact_match"] == pytest.approx(2 / 3)  # the third differs only in whitespace
    assert result["counts"]["records"] == 3 and result["config"]["predictions"] == str(preds_file)
    assert "| bleu |" in proc.stdout and "| metric | base | tuned | delta |" in proc.stdout
    assert (tmp_path / "x.md").read_text(encoding="utf-8") in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "x_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["exact_match"] for r in rows] == [True, False, True]
    assert (tmp_path / "x.config.json").exists()


def test_baseline_predictions_are_scored_when_every_record_has_one(tmp_path, capsys):
    records = [{**r, "baseline_prediction": r.get("baseline_prediction", "no idea")} for r in PREDICTION_RECORDS]
    out = tmp_path / "eval.json"
    assert main(["eval", "--predictions", str(write_jsonl(tmp_path / "p.jsonl", records)), "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["baseline"]["exact_match"] == 0 and result["metrics"]["exact_match"] == pytest.approx(2 / 3)
    assert "| exact_match | 0.0000 | 0.6667 | +0.6667 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv_tail, record, message", [
    ([], {"output": "a"}, "p.jsonl:1: prediction: missing"),
    (["--limit", "0"], PREDICTION_RECORDS[0], "--limit"),
    (["--baseline", "SmolLM2-135M-Instruct"], PREDICTION_RECORDS[0], "--baseline"),
])
def test_user_mistakes_are_one_line_and_nothing_is_written(tmp_path, capsys, argv_tail, record, message):
    preds_file = write_jsonl(tmp_path / "p.jsonl", [record])
    out = tmp_path / "eval.json"
    assert main(["eval", "--predictions", str(preds_file), "--out", str(out), *argv_tail]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "eval.md").exists()


def test_missing_model_or_bad_data_fails_before_any_work(tmp_path, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "x"}])
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "e.json")]) == 2
    assert "val.jsonl:1: output: missing" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", DATA_RECORDS[:1])
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(good), "--out", str(tmp_path / "e.json")]) == 2
    assert "--model" in capsys.readouterr().err
    bad_messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["eval", "--data", str(bad_messages), "--out", str(tmp_path / "e.json")]) == 2
    assert "last turn must be the assistant's" in capsys.readouterr().err


def test_tiny_model_with_baseline_end_to_end(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", DATA_RECORDS)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--data", str(data),
            "--out", str(out), "--limit", "3", "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"metrics", "baseline", "config", "counts"} <= set(result)
    for side in ("metrics", "baseline"):
        metrics = result[side]
        assert METRIC_KEYS <= set(metrics)
        assert {"bleu_en", "bleu_ja"} <= set(metrics)  # the set mixes English and Japanese
        for key in ("token_accuracy", "exact_match", "rouge_l"):
            assert 0 <= metrics[key] <= 1
        assert 0 <= metrics["bleu"] <= 100
        assert metrics["loss"] > 0 and metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    # The same model on both sides: the same numbers, a zero delta.
    assert result["metrics"] == pytest.approx(result["baseline"])
    counts = result["counts"]
    assert counts["records"] == 3 and counts["languages"] == {"en": 2, "ja": 1}
    assert counts["tuned"]["scored_records"] == 3 and counts["tuned"]["dropped"] == 0
    assert result["config"]["template"] == "alpaca" and result["config"]["max_length"] == 512
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert table in capsys.readouterr().out
    assert all(f"| {key}" in table for key in METRIC_KEYS)
    rows = [json.loads(line) for line in (tmp_path / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert all({"prediction", "baseline_prediction", "loss", "rouge_l"} <= set(r) for r in rows)


def test_settings_of_the_training_run_apply_and_a_cut_away_response_leaves_loss_absent(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    for path in tiny_model_dir.iterdir():
        (model_dir / path.name).symlink_to(path)
    # Every chat prompt is longer than 8 tokens, so no response token is left to score.
    (model_dir / "train_config.json").write_text(json.dumps({"template": "chat", "max_length": 8}))
    data = write_jsonl(tmp_path / "val.jsonl", DATA_RECORDS[:2])
    stats = ev.run(ev.Config(model=str(model_dir), data=str(data), out=str(tmp_path / "eval.json"),
                             max_new_tokens=2, device="cpu"))
    assert set(stats.metrics) == {"exact_match", "bleu", "rouge_l", "bleu_en", "bleu_ja"}
    assert stats.counts["tuned"]["dropped"] == 2 and stats.counts["tuned"]["response_tokens"] == 0
    config = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["config"]
    assert (config["template"], config["max_length"]) == ("chat", 8)
    resolved = json.loads((tmp_path / "eval.config.json").read_text(encoding="utf-8"))
    assert resolved["stage"] == "eval" and resolved["resolved"] == {"template": "chat", "max_length": 8}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from pipeline.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_batched_teacher_forcing_equals_one_record_at_a_time(tiny, template):
    import torch

    from pipeline.templates import encode_example

    model, tokenizer = tiny
    records = DATA_RECORDS[:3]
    (loss_sum, correct, tokens), record_loss, counts = ev.teacher_forced(model, tokenizer, records, template, 512, 3, "t")
    expected_sum, expected_tokens = 0.0, 0
    for record, loss in zip(records, record_loss):
        example = encode_example(record, tokenizer, template, 512)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels]))
        n = example.num_trained_tokens
        assert loss == pytest.approx(float(out.loss), abs=1e-4)
        expected_sum += float(out.loss) * n
        expected_tokens += n
    assert tokens == expected_tokens == counts["response_tokens"]
    assert loss_sum == pytest.approx(expected_sum, abs=1e-3)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    records = DATA_RECORDS[:3]  # prompts of different lengths, so the batch is padded
    batched, counts = ev.generate_answers(model, tokenizer, records, "alpaca", 5, 3, "t")
    single, _ = ev.generate_answers(model, tokenizer, records, "alpaca", 5, 1, "t")
    assert batched == single
    assert counts["generated_tokens"] <= 3 * 5  # cut at EOS or at --max-new-tokens


def test_seed_instances_are_one_record_each(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"id": "s1", "instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]},
        {"id": "s2", "instruction": "Greet.", "instances": [{"input": "", "output": "Hi"}]},
    ])
    records = ev.load_eval_records(ev.Config(data="seeds", seeds=str(seeds)))
    assert [(r["id"], r["input"], r["output"]) for r in records] == [("s1#0", "1 2", "3"), ("s1#1", "2 2", "4"), ("s2#0", "", "Hi")]
    assert len(ev.load_eval_records(ev.Config(data="seeds", seeds=str(seeds), limit=2))) == 2


def test_template_and_length_come_from_the_training_run(tmp_path):
    assert ev.train_settings(tmp_path) == {}
    (tmp_path / "train_config.json").write_text(json.dumps({"template": "chat", "max_length": 128}))
    assert ev.train_settings(tmp_path) == {"template": "chat", "max_length": 128}
    (tmp_path / "train_config.json").write_text(json.dumps({"config": {"template": "chat", "max_length": 64}}))
    assert ev.train_settings(tmp_path) == {"template": "chat", "max_length": 64}
