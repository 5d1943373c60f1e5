"""What a token limit cuts, per language: SmolLM2's tokenizer spends far more tokens on Japanese,
so `finetune`'s pre-flight and `eval`'s counts say which language the limits cut."""

from __future__ import annotations

import pytest

from pipeline import token_budget as B
from pipeline.templates import encode_example
from tests.conftest import write_jsonl

# Equally long in the units `inspect` reports (300 words / 300 characters), not in tokens.
ENGLISH_LONG = {"instruction": "Retell the story.", "output": " ".join(["the cat sat on a warm mat"] * 43)}
JAPANESE_LONG = {"instruction": "物語を書き直してください。", "output": ("猫は暖かいマットの上に座った。" * 20)}
SHORT = [{"instruction": "Name a colour.", "output": "Blue."}, {"instruction": "色を一つ挙げてください。", "output": "青"}]


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir)


def test_smollm2_spends_far_more_tokens_on_japanese_than_on_english(tokenizer):
    assert len(ENGLISH_LONG["output"].split()) == 301 and len(JAPANESE_LONG["output"]) == 300
    english = len(tokenizer(ENGLISH_LONG["output"], add_special_tokens=False)["input_ids"])
    japanese = len(tokenizer(JAPANESE_LONG["output"], add_special_tokens=False)["input_ids"])
    assert english < 400 < 450 < japanese  # ~1.3 tokens a word against ~1.7 a character


def test_cuts_are_counted_per_language(tokenizer):
    records = [ENGLISH_LONG, JAPANESE_LONG, *SHORT]
    examples = [encode_example(r, tokenizer, "alpaca", 450) for r in records]
    languages = [B.record_language(r) for r in records]
    assert languages == ["en", "ja", "en", "ja"]
    cuts = B.cuts_by_language(examples, languages)
    assert cuts == {"en": {"records": 2, "truncated": 0, "dropped": 0}, "ja": {"records": 2, "truncated": 1, "dropped": 0}}
    assert B.describe(cuts) == "en 0/2 truncated (0.0%), 0 dropped; ja 1/2 truncated (50.0%), 0 dropped"


def test_a_chat_record_takes_the_language_of_its_first_user_turn():
    record = {"messages": [{"role": "system", "content": "You are helpful."},
                           {"role": "user", "content": "次の英文を翻訳してください: I like cats."},
                           {"role": "assistant", "content": "I like cats."}]}
    assert B.record_language(record) == "ja"


def test_eval_counts_references_longer_than_max_new_tokens_per_language(tokenizer):
    records = [ENGLISH_LONG, JAPANESE_LONG, *SHORT]
    references = [r["output"] for r in records]
    languages = ["en", "ja", "en", "ja"]
    assert B.answers_over_limit(tokenizer, references, languages, 420) == {"en": 0, "ja": 1}
    cuts = B.eval_cuts(tokenizer, records, references, languages, "alpaca", 4096, 420)
    assert cuts["ja"] == {"records": 2, "truncated": 0, "dropped": 0, "answers_over_max_new_tokens": 1}
    assert "ja 0/2 truncated (0.0%), 0 dropped, 1 references longer than --max-new-tokens" in B.describe(cuts)


def test_finetune_preflight_says_what_max_length_cuts_per_language(tiny_model_dir, tmp_path, capsys):
    from pipeline.finetune import Config, run

    data = write_jsonl(tmp_path / "train.jsonl", [ENGLISH_LONG, JAPANESE_LONG, *SHORT])
    run(Config(data=str(data), output_dir=str(tmp_path / "run"), model=str(tiny_model_dir), max_length=450,
               max_steps=1, val_fraction=0.0, eval_every=0, save_every=0, batch_size=4, device="cpu", seed=0))
    out = capsys.readouterr().out
    assert ("cut at --max-length 450, per language: en 0/2 truncated (0.0%), 0 dropped; "
            "ja 1/2 truncated (50.0%), 0 dropped") in out
