"""The eval stage end to end: `--predictions` through the CLI, a tiny model with a baseline, and
the batched paths against one-record-at-a-time runs."""

from __future__ import annotations

import json
import math
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
ROUGE_KEYS = {f"{name}{part}" for name in ("rouge_1", "rouge_2", "rouge_l") for part in ("", "_precision", "_recall")}
GENERATION_KEYS = {"sequence_accuracy", "exact_match", "bleu", "chrf"} | ROUGE_KEYS
METRIC_KEYS = {"loss", "perplexity", "token_accuracy"} | GENERATION_KEYS

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
    assert set(metrics) == GENERATION_KEYS  # loss & co. do not apply: absent, not 0
    assert "baseline" not in result
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert result["config"]["bleu_tokenize"] == {"en": "13a"}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for ours, theirs in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
        assert metrics[ours] == pytest.approx(sum(s[theirs].fmeasure for s in scores) / 3)
        assert metrics[f"{ours}_precision"] == pytest.approx(sum(s[theirs].precision for s in scores) / 3)
        assert metrics[f"{ours}_recall"] == pytest.approx(sum(s[theirs].recall for s in scores) / 3)
    # The third differs only in whitespace: the normalised match counts it, the strict one does not.
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["sequence_accuracy"] == pytest.approx(1 / 3)
    assert result["counts"]["records"] == 3 and result["config"]["predictions"] == str(preds_file)
    assert "| bleu |" in proc.stdout and "| metric | base | tuned | delta |" in proc.stdout
    assert (tmp_path / "x.md").read_text(encoding="utf-8") in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "x_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["exact_match"] for r in rows] == [True, False, True]
    assert [r["sequence_match"] for r in rows] == [True, False, False]
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


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's architecture and tokenizer with other random weights: a second, different model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    out = tmp_path_factory.mktemp("other-model")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def teacher_forced_loss(model_dir: Path, records: list[dict]) -> float:
    """One model's response loss on `records`, scored on its own."""
    from pipeline.models import load_model, load_tokenizer

    (loss_sum, _, tokens), _, _ = ev.teacher_forced(load_model(str(model_dir), device="cpu"), load_tokenizer(str(model_dir)),
                                                    records, "alpaca", 512, 8, "t")
    return loss_sum / tokens


def test_tiny_model_with_baseline_end_to_end(tmp_path, tiny_model_dir, other_model_dir, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", DATA_RECORDS)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--baseline", str(other_model_dir), "--data", str(data),
            "--out", str(out), "--limit", "3", "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"metrics", "baseline", "config", "counts"} <= set(result)
    for side in ("metrics", "baseline"):
        metrics = result[side]
        assert METRIC_KEYS <= set(metrics)
        for key in ("token_accuracy", "exact_match", "rouge_l"):
            assert 0 <= metrics[key] <= 1
        assert 0 <= metrics["bleu"] <= 100
        assert metrics["loss"] > 0 and metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    # Two different models: each side holds its own model's numbers (scoring --model twice fails here).
    assert result["metrics"]["loss"] == pytest.approx(teacher_forced_loss(tiny_model_dir, DATA_RECORDS[:3]), rel=1e-5)
    assert result["baseline"]["loss"] == pytest.approx(teacher_forced_loss(other_model_dir, DATA_RECORDS[:3]), rel=1e-5)
    assert result["metrics"]["loss"] != pytest.approx(result["baseline"]["loss"], rel=1e-3)
    counts = result["counts"]
    assert counts["records"] == 3 and counts["languages"] == {"en": 2, "ja": 1}
    by_language = result["breakdown"]["language"]  # the set mixes English and Japanese
    assert {lang: entry["records"] for lang, entry in by_language.items()} == {"en": 2, "ja": 1}
    for side in ("tuned", "baseline"):
        assert {"bleu", "token_accuracy", "sequence_accuracy"} <= set(by_language["ja"][side])
    assert counts["tuned"]["scored_records"] == 3 and counts["tuned"]["dropped"] == 0
    assert result["config"]["template"] == "alpaca" and result["config"]["max_length"] == 512
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    assert table in printed
    assert all(f"| {key}" in table for key in METRIC_KEYS)
    # What --max-length and --max-new-tokens cut, per language: 4 new tokens hold "Hello there!"
    # and "5" with their EOS, not 私は猫が好きです。 (SmolLM2 spends ~1.7 tokens a Japanese character).
    assert counts["tuned"]["by_language"]["ja"] == {"records": 1, "truncated": 0, "dropped": 0, "answers_over_max_new_tokens": 1}
    assert ("tuned: cut per language: en 0/2 truncated (0.0%), 0 dropped, 0 references longer than --max-new-tokens; "
            "ja 0/1 truncated (0.0%), 0 dropped, 1 references longer than --max-new-tokens") in printed
    rows = [json.loads(line) for line in (tmp_path / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert all({"prediction", "baseline_prediction", "loss", "rouge_l"} <= set(r) for r in rows)


@pytest.mark.parametrize("bf16_cpu, dtype, generated_in", [(True, "auto", "bf16"), (True, "fp32", "fp32"),
                                                              (False, "auto", "fp32")])
def test_answers_are_generated_in_bf16_only_where_bf16_is_native_and_the_loss_stays_fp32(
        tmp_path, tiny_model_dir, monkeypatch, capsys, bf16_cpu, dtype, generated_in):
    from pipeline import models

    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: bf16_cpu)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(write_jsonl(tmp_path / "v.jsonl", DATA_RECORDS)),
                 "--out", str(out), "--limit", "3", "--max-new-tokens", "4", "--device", "cpu", "--dtype", dtype]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["counts"]["tuned"]["precision"] == {"teacher_forced": "fp32", "generate": generated_in}
    assert result["metrics"]["loss"] == pytest.approx(teacher_forced_loss(tiny_model_dir, DATA_RECORDS[:3]), rel=1e-5)
    assert f"generated in {generated_in})" in capsys.readouterr().out


def test_a_limit_takes_each_language_in_turn_and_keeps_the_file_order():
    english = [{"instruction": f"Task {i}.", "output": f"Answer number {i}."} for i in range(5)]
    japanese = [{"instruction": f"課題{i}。", "output": f"これは答え{i}です。"} for i in range(3)]
    records = english + japanese  # a held-out set that lists its English tasks first
    chosen = ev.spread_over_languages(records, 5)
    assert chosen == [english[0], english[1], english[2], japanese[0], japanese[1]]
    assert ev.spread_over_languages(records, 100) == records
    assert ev.spread_over_languages(records, 1) == [english[0]]


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
    assert set(stats.metrics) == GENERATION_KEYS  # no response token scored: loss & co. absent, not 0
    by_language = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["breakdown"]["language"]
    assert {lang: set(entry["tuned"]) for lang, entry in by_language.items()} == {"en": GENERATION_KEYS, "ja": GENERATION_KEYS}
    assert stats.counts["tuned"]["dropped"] == 2 and stats.counts["tuned"]["response_tokens"] == 0
    # What the limits cut, per language: both prompts are cut at 8 tokens, and neither
    # reference fits in 2 new tokens with its EOS.
    cut = {"records": 1, "truncated": 1, "dropped": 1, "answers_over_max_new_tokens": 1}
    assert stats.counts["tuned"]["by_language"] == {"en": cut, "ja": cut}
    config = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["config"]
    assert (config["template"], config["max_length"]) == ("chat", 8)
    resolved = json.loads((tmp_path / "eval.config.json").read_text(encoding="utf-8"))
    assert resolved["stage"] == "eval" and resolved["resolved"] == {"template": "chat", "max_length": 8}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from pipeline.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("budget", [2048, 40])  # one padded batch; length groups (the Japanese record alone)
def test_batched_teacher_forcing_equals_one_record_at_a_time(tiny, template, budget, monkeypatch):
    import torch

    from pipeline import batching
    from pipeline.templates import encode_example

    monkeypatch.setattr(batching, "CPU_TOKEN_BUDGET", budget)
    model, tokenizer = tiny
    records = DATA_RECORDS[:3]
    (loss_sum, correct, tokens), record_sums, counts = ev.teacher_forced(model, tokenizer, records, template, 512, 3, "t")
    assert correct == sum(hits for _, hits, _ in record_sums)
    expected_sum, expected_tokens = 0.0, 0
    for record, (record_loss, _, record_tokens) in zip(records, record_sums):
        loss = record_loss / record_tokens
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
    batched, counts, batched_ids = ev.generate_answers(model, tokenizer, records, "alpaca", 5, 3, "t")
    single, _, single_ids = ev.generate_answers(model, tokenizer, records, "alpaca", 5, 1, "t")
    assert batched == single and batched_ids == single_ids
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


JAPANESE_PREDICTIONS = [
    {"instruction": "次の文の感情を判定し、「肯定」か「否定」で答えてください。", "input": "最高の一日だった。",
     "output": "肯定", "prediction": "肯定。"},
    {"instruction": "合計金額を計算してください。", "input": "1200円の本を3冊", "output": "3600円", "prediction": "３６００円"},
    {"instruction": "日本語に翻訳してください。", "input": "I like cats.", "output": "私は猫が好きです。", "prediction": "私は犬が好きです。"},
    {"instruction": "Name the capital.", "output": "Paris is the capital of France.", "prediction": "Paris is the capital of France."},
]


def test_eval_json_and_md_name_the_bleu_tokenizer_and_define_every_measure(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--predictions", str(write_jsonl(tmp_path / "p.jsonl", JAPANESE_PREDICTIONS)), "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    tokenizers = result["config"]["bleu_tokenize"]
    assert tokenizers["en"] == "13a" and tokenizers["ja"].startswith("ja-mecab-")  # with MeCab's version
    metrics = result["metrics"]
    # 「肯定。」 and 「３６００円」 are right answers the strict sequence_accuracy misses.
    assert metrics["sequence_accuracy"] == pytest.approx(1 / 4)
    assert metrics["exact_match"] == pytest.approx(3 / 4)
    japanese = JAPANESE_PREDICTIONS[:3]
    by_language = result["breakdown"]["language"]
    assert by_language["ja"]["tuned"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(
        [r["prediction"] for r in japanese], [[r["output"] for r in japanese]], tokenize="ja-mecab").score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(
        [r["prediction"] for r in JAPANESE_PREDICTIONS], [[r["output"] for r in JAPANESE_PREDICTIONS]]).score)
    assert {"rouge_l", "chrf"} <= set(by_language["en"]["tuned"]) & set(by_language["ja"]["tuned"])
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert table in capsys.readouterr().out
    for key in GENERATION_KEYS:
        assert f"| {key} |" in table
        defined = key if not key.endswith(("_precision", "_recall")) else "rouge_*_" + key.rsplit("_", 1)[1]
        assert f"\n- {defined}: " in table
    assert f"tokenizers: en 13a, ja {tokenizers['ja']}" in table
    assert "## By language" in table and "| ja | 3 | sequence_accuracy |" in table
    rows = [json.loads(line) for line in (tmp_path / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["exact_match"] for r in rows] == [True, True, False, True]
    assert [r["sequence_match"] for r in rows] == [False, False, False, True]


def test_a_lora_run_without_merge_is_evaluated_on_its_portably_named_base(tmp_path, tiny_model_dir, monkeypatch):
    """`eval --model runs/sft` after `finetune --lora` (no --merge): the adapter is loaded on its base,
    which it names as the user did (the embedded model's name), not by this machine's cache path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline import finetune
    from pipeline.models import EMBEDDED_MODEL

    # The tiny model stands in for the embedded one: the converted-model cache is an ordinary folder.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / EMBEDDED_MODEL).symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.setenv("SELF_INSTRUCT_CACHE", str(cache))
    train = write_jsonl(tmp_path / "train.jsonl", DATA_RECORDS[:3] * 2)
    run_dir = tmp_path / "sft"
    finetune.run(finetune.Config(data=str(train), output_dir=str(run_dir), model="smollm2", lora=4, max_steps=2, lr=1e-2,
                                 lr_schedule="constant", val_fraction=0.0, eval_every=0, save_every=0, device="cpu"))
    assert not (run_dir / "config.json").exists()  # no merged model: only the adapter
    adapter_config = (run_dir / "adapter" / "adapter_config.json").read_text(encoding="utf-8")
    assert json.loads(adapter_config)["base_model_name_or_path"] == EMBEDDED_MODEL
    assert str(cache) not in adapter_config and str(tiny_model_dir) not in adapter_config

    data = write_jsonl(tmp_path / "val.jsonl", DATA_RECORDS[:3])
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run_dir), "--baseline", EMBEDDED_MODEL, "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    merged_dir = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload().save_pretrained(merged_dir)
    (merged_dir / "tokenizer.json").symlink_to(tiny_model_dir / "tokenizer.json")
    (merged_dir / "tokenizer_config.json").symlink_to(tiny_model_dir / "tokenizer_config.json")
    assert result["metrics"]["loss"] == pytest.approx(teacher_forced_loss(merged_dir, DATA_RECORDS[:3]), rel=1e-5)
    assert result["baseline"]["loss"] == pytest.approx(teacher_forced_loss(tiny_model_dir, DATA_RECORDS[:3]), rel=1e-5)
    assert result["metrics"]["loss"] != pytest.approx(result["baseline"]["loss"], rel=1e-4)  # the adapter is applied


# ---------------------------------------------------------------- judged comparison

JUDGED_RECORDS = [
    {"instruction": "What is 7 x 6?", "output": "42", "prediction": "The answer is 42.", "baseline_prediction": "48"},
    {"instruction": "日本の首都はどこですか？", "output": "東京です。", "prediction": "首都は東京です。", "baseline_prediction": "大阪です。"},
    {"instruction": "Name a primary colour.", "output": "Red", "prediction": "Blue is one.", "baseline_prediction": "Green"},
]


def judge_request_kind(body: dict) -> str:
    return body["response_format"]["json_schema"]["name"]  # "verdict" (pairwise) or "judgement" (pointwise)


def always_first(body: dict) -> str:
    """A judge with pure position bias: whatever it is shown first wins; every answer scores 3."""
    if judge_request_kind(body) == "verdict":
        return '{"reason": "The first answer is better.", "winner": "A"}'
    return '{"reason": "Fine.", "score": 3}'


def knows_the_answer(body: dict) -> str:
    """A fair judge: prefers the answer that contains the reference, whichever place it is shown in."""
    prompt = body["messages"][0]["content"]
    reference = prompt.split("compare the answer with it]\n", 1)[-1].split("\n", 1)[0] if "compare the answer" in prompt \
        else prompt.split("比べてください）】\n", 1)[-1].split("\n", 1)[0]
    core = reference.rstrip("。")
    if judge_request_kind(body) == "verdict":
        first = prompt.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0] if "[Answer A]" in prompt else \
            prompt.split("【回答A】\n", 1)[1].split("\n\n【回答B】", 1)[0]
        second = prompt.split("[Answer B]\n", 1)[1] if "[Answer B]" in prompt else prompt.split("【回答B】\n", 1)[1]
        winner = "A" if core in first else "B" if core in second.split("\n\n", 1)[0] else "tie"
        return json.dumps({"reason": "checked against the reference", "winner": winner})
    answer = prompt.rsplit("\n\n", 2)[-2]
    return json.dumps({"reason": "checked", "score": 5 if core in answer else 1})


def judged_eval(tmp_path, fake_openai, records) -> dict:
    out = tmp_path / "eval.json"
    assert main(["eval", "--predictions", str(write_jsonl(tmp_path / "p.jsonl", records)), "--out", str(out),
                 "--judge-backend", "openai", "--judge-base-url", fake_openai.base_url, "--judge-model", "fake-judge"]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def fair_judge_probabilities(body: dict) -> dict[str, float]:
    """The fair judge of `knows_the_answer`, answering in next-token probabilities: 0.9 on its
    verdict letter or score digit, the rest spread over the other choices."""
    prompt = body["messages"][0]["content"]
    pairwise = "[Answer A]" in prompt or "【回答A】" in prompt
    fake = dict(body, response_format={"json_schema": {"name": "verdict" if pairwise else "judgement"}})
    reply = json.loads(knows_the_answer(fake))
    if pairwise:
        choice = {"A": "A", "B": "B", "tie": "C"}[reply["winner"]]
        return {token: math.log(0.9 if token == choice else 0.05) for token in "ABC"}
    return {str(d): math.log(0.9 if d == reply["score"] else 0.025) for d in range(1, 6)}


def test_probability_scoring_reads_verdicts_and_scores_from_the_judges_token_probabilities(tmp_path, fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-eval-judge")
    fake_openai.answer = lambda body: "A"
    fake_openai.top_logprobs = fair_judge_probabilities
    out = tmp_path / "eval.json"
    assert main(["eval", "--predictions", str(write_jsonl(tmp_path / "p.jsonl", JUDGED_RECORDS)), "--out", str(out),
                 "--judge-backend", "openai", "--judge-base-url", fake_openai.base_url, "--judge-model", "fake-judge",
                 "--judge-scoring", "probs"]) == 0
    judge = json.loads(out.read_text(encoding="utf-8"))["judge"]
    # The text reply ("A" every time) would make every verdict a flip; the probabilities decide.
    assert (judge["wins"], judge["ties"], judge["losses"]) == (2, 1, 0) and judge["flip_rate"] == 0.0
    assert judge["reference_score"]["base"] == pytest.approx(0.9 * 1 + 0.025 * (2 + 3 + 4 + 5))
    assert all(b.get("logprobs") and "response_format" not in b for b in fake_openai.bodies)
    assert any("日本の首都" in b["messages"][0]["content"] for b in fake_openai.bodies)


def test_judge_scoring_auto_is_probs_on_the_local_backend_and_text_on_a_server():
    assert ev.Config(model="m", baseline="b", judge_backend="local").resolved_judge_scoring == "probs"
    assert ev.Config(model="m", baseline="b", judge_backend="openai").resolved_judge_scoring == "text"
    assert ev.Config(model="m", baseline="b", judge_backend="local", judge_scoring="text").resolved_judge_scoring == "text"


def test_a_position_biased_judge_gives_ties_never_a_false_win(tmp_path, fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-eval-judge")
    fake_openai.answer = always_first
    result = judged_eval(tmp_path, fake_openai, JUDGED_RECORDS)
    judge = result["judge"]
    assert (judge["wins"], judge["ties"], judge["losses"], judge["unread"]) == (0, 3, 0, 0)
    assert judge["win_rate"] == 0.5 and judge["flip_rate"] == 1.0
    assert judge["reference_score"] == {"tuned": 3.0, "base": 3.0}
    verdicts = [b for b in fake_openai.bodies if judge_request_kind(b) == "verdict"]
    assert len(verdicts) == 2 * len(JUDGED_RECORDS)  # every pair in both orders
    rows = [json.loads(line) for line in (tmp_path / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["judge"]["winner"] == "tie" and r["judge"]["flipped"] for r in rows)
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert "## Judged: tuned against base" in table and "- win_rate: 0.5000" in table and "- flip_rate: 1.0000" in table


def test_a_fair_judge_finds_the_better_model_in_both_orders(tmp_path, fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-eval-judge")
    fake_openai.answer = knows_the_answer
    judge = judged_eval(tmp_path, fake_openai, JUDGED_RECORDS)["judge"]
    # The tuned answers hold 42 and 東京 (worded unlike the references); neither colour answer is right.
    assert (judge["wins"], judge["ties"], judge["losses"]) == (2, 1, 0)
    assert judge["win_rate"] == pytest.approx(2.5 / 3) and judge["flip_rate"] == 0.0
    assert judge["reference_score"]["tuned"] == pytest.approx((5 + 5 + 1) / 3) and judge["reference_score"]["base"] == 1.0


def test_judging_needs_a_base_to_compare_with(tmp_path, capsys):
    records = [{k: v for k, v in r.items() if k != "baseline_prediction"} for r in JUDGED_RECORDS]
    argv = ["eval", "--predictions", str(write_jsonl(tmp_path / "p.jsonl", records)), "--out", str(tmp_path / "e.json"),
            "--judge-backend", "openai"]
    assert main(argv) == 2
    assert "--judge-backend:" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--data", "heldout", "--judge-backend", "local"]) == 2
    assert "give --baseline too" in capsys.readouterr().err
