"""pipeline/cards.py: the model card finetune writes (and eval fills in), the dataset cards respond and mix write."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipeline import cards
from pipeline.models import EMBEDDED_HUB_ID, EMBEDDED_LICENSE
from tests.conftest import write_jsonl

TRAIN = [
    {"instruction": "Give a synonym of happy.", "input": "", "output": "glad", "source": "self-instruct"},
    {"instruction": "日本の首都はどこですか。", "input": "", "output": "東京です。", "source": "self-instruct"},
    {"instruction": "次の文を英語に翻訳してください。", "input": "吾輩は猫である。", "output": "I am a cat.", "source": "dolly"},
    {"instruction": "Is 7 even?", "input": "", "output": "no", "source": "dolly", "is_classification": True},
]


def is_decision(body: dict) -> bool:
    """respond's question whether a task is classification (English or Japanese prompt)."""
    text = json.dumps(body, ensure_ascii=False)
    return "Is this a classification task?" in text or "分類タスクですか" in text


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_finetune_writes_a_model_card_and_eval_fills_its_evaluation(tiny_model_dir, tmp_path):
    from huggingface_hub import ModelCard

    from pipeline import eval as ev
    from pipeline import finetune

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a base model\n", encoding="utf-8")
    data = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    out = tmp_path / "run"
    finetune.run(finetune.Config(data=str(data), output_dir=str(out), model=str(base), max_steps=2, batch_size=2,
                                 val_fraction=0.0, eval_every=0, save_every=0, device="cpu", lr=1e-3))

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(base)
    assert card.data.license == "apache-2.0"  # the base's own, from its card
    assert card.data.library_name == "transformers"
    assert card.data.datasets == ["train.jsonl"]
    assert {"self-instruct", "finetune", "sft"} <= set(card.data.tags)
    assert sorted(card.data.language) == ["en", "ja"]
    assert sha256(data) in card.text
    assert "| ja | 2 |" in card.text and "| en | 2 |" in card.text
    assert "| self-instruct | 2 |" in card.text and "| dolly | 2 |" in card.text
    assert "| `max_steps` | `2` |" in card.text
    assert cards.LIMITS in card.text and cards.NO_EVAL in card.text
    saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))["provenance"]
    assert saved["libraries"]["transformers"] and "git_commit" in saved
    assert f"git commit: {saved['git_commit'] or 'unknown (no git)'}" in card.text

    evaluated = tmp_path / "eval.json"
    ev.run(ev.Config(model=str(out), data=str(data), out=str(evaluated), max_new_tokens=2, device="cpu"))
    card = ModelCard.load(out / "README.md")
    table = evaluated.with_suffix(".md").read_text(encoding="utf-8")
    assert table.strip() in card.text and cards.NO_EVAL not in card.text
    assert card.data.base_model == str(base)  # the front matter survives the refresh


def test_the_embedded_base_is_named_by_its_hub_id_and_license():
    assert cards.base_model_info("SmolLM2-135M-Instruct") == (EMBEDDED_HUB_ID, EMBEDDED_LICENSE)


def test_a_base_without_a_card_claims_no_license(tiny_model_dir):
    assert cards.base_model_info(str(tiny_model_dir)) == (str(tiny_model_dir), None)


def test_refresh_leaves_a_card_not_written_here_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# someone's model\n<!-- eval:start -->\nx\n<!-- eval:end -->\n", encoding="utf-8")
    assert cards.refresh_model_card_eval(tmp_path, "| metric |") is False
    assert readme.read_text(encoding="utf-8") == "# someone's model\n<!-- eval:start -->\nx\n<!-- eval:end -->\n"


def test_respond_card_beside_a_committed_readme_and_load_dataset_finds_the_file(tmp_path, fake_openai):
    import datasets

    from pipeline import filter as filter_stage
    from pipeline import respond

    folder = tmp_path / "data"
    folder.mkdir()
    committed = "# data/\n\nThe repository's own notes.\n"
    (folder / "README.md").write_text(committed, encoding="utf-8")
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"id": "s1", "instruction": "Write a haiku about rain.", "is_classification": False,
         "instances": [{"input": "", "output": "Rain taps the window"}]},
        {"id": "s2", "instruction": "好きな季節について短い文を書いてください。", "is_classification": False,
         "instances": [{"input": "", "output": "春が好きです。"}]}])
    candidates = write_jsonl(folder / "machine.jsonl", [
        {"id": "m1", "instruction": "Explain why the sky is blue in one sentence."},
        {"id": "m2", "instruction": "富士山の高さを教えてください。"},
        {"id": "m3", "instruction": "Explain why the sky is blue in one sentence!"}])  # a near duplicate
    filtered = folder / "filtered.jsonl"
    filter_stage.run(filter_stage.Config(in_path=str(candidates), seeds=str(seeds), out=str(filtered)))
    fake_openai.answer = lambda body: "No" if is_decision(body) else "Input: 例\nOutput: 答えです。"
    out = folder / "alpaca_data.jsonl"
    respond.run(respond.Config(in_path=str(filtered), seeds=str(seeds), out=str(out), cache=False,
                               cache_dir=str(tmp_path / "cache"), backend="openai", base_url=fake_openai.base_url,
                               max_retries=0))

    assert (folder / "README.md").read_text(encoding="utf-8") == committed
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(written) == 2
    loaded = datasets.load_dataset(str(folder), "alpaca_data", split="train")
    assert sorted(loaded["instruction"]) == sorted(r["instruction"] for r in written)
    assert "富士山の高さを教えてください。" in loaded["instruction"]
    assert datasets.load_dataset(str(folder), split="train")["id"] == loaded["id"]  # the default: the last written

    card = (folder / "alpaca_data.card.md").read_text(encoding="utf-8")
    assert sha256(seeds) in card and sha256(out) in card
    assert "- filter threshold (ROUGE-L): `0.7`" in card
    assert "| filter: near_duplicate | 1 |" in card
    assert "| ja | 1 |" in card and "| en | 1 |" in card and "| generation | 2 |" in card
    model = written[0]["model"]
    assert f"| openai: {model} | 2 |" in card
    assert "carry that provider's terms of use" in card


def test_mix_cards_in_a_folder_of_its_own_make_one_dataset_card(tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    from pipeline import mix

    sources = tmp_path / "in"
    sources.mkdir()
    a = write_jsonl(sources / "a.jsonl", TRAIN[:2])
    b = write_jsonl(sources / "b.jsonl", TRAIN[2:])
    folder = tmp_path / "mixed"
    folder.mkdir()
    mix.run(mix.Config(in_paths=(str(a), str(b)), out=str(folder / "first.jsonl")))
    mix.run(mix.Config(in_paths=(str(b),), out=str(folder / "second.jsonl")))

    card = DatasetCard.load(folder / "README.md")
    assert [c["config_name"] for c in card.data.configs] == ["first", "second"]
    assert "## first.jsonl" in card.text and "## second.jsonl" in card.text
    assert "provider's terms" not in card.text  # nothing here was written by a hosted model
    first = datasets.load_dataset(str(folder), "first", split="train")
    assert sorted(first["instruction"]) == sorted(r["instruction"] for r in TRAIN)
    assert datasets.load_dataset(str(folder), split="train").num_rows == 2  # second, the last written
    first_card = (folder / "first.card.md").read_text(encoding="utf-8")
    assert sha256(a) in first_card and sha256(b) in first_card


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "日本語で答えてください。"}, "ja"),
    ({"messages": [{"role": "user", "content": "こんにちは、元気ですか。"}]}, "ja"),
    ({"instruction": "x", "instruction_provenance": {"language": "ja"}}, "ja"),
    ({"instruction": "Say hello."}, "en"),
])
def test_record_language(record, expected):
    assert cards.record_language(record) == expected


def test_no_card_for_a_device_output_or_an_empty_one(tmp_path):
    import os

    assert cards.write_dataset_card(Path(os.devnull), stage="respond", records=None, inputs={}) is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert cards.write_dataset_card(empty, stage="respond", records=None, inputs={}) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]
