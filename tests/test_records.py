"""What a training record is (one checker for finetune, mix and eval) and the train_config.json contract."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import InputError, UserError
from pipeline.records import TRAIN_CONFIG, check_training_record, train_settings, training_record_validator

CHAT = {"messages": [{"role": "system", "content": "丁寧に答えてください。"}, {"role": "user", "content": "こんにちは"},
                     {"role": "assistant", "content": "こんにちは！ご用件は何でしょうか。"}]}


@pytest.mark.parametrize("record", [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "次の文を英語に翻訳してください。", "input": "猫が好きです。", "output": "I like cats."},
    {"instruction": "Say nothing.", "input": None, "output": ""},  # an empty answer still trains the EOS
    CHAT,
])
def test_training_records_that_pass(record):
    check_training_record(record, 1, "d.jsonl")
    check_training_record(record, 1, "d.jsonl", template="chat", reference_last=True)


@pytest.mark.parametrize("record, template, reference_last, message", [
    ({"instruction": "x"}, None, False, "d.jsonl:3: output: missing"),
    ({"instruction": "  ", "output": "y"}, None, False, "d.jsonl:3: instruction: empty"),
    ({"instruction": "x", "output": 5}, None, False, "d.jsonl:3: output: expected a string, got 5"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, None, False, "d.jsonl:3: input: expected a string"),
    (CHAT, "alpaca", False, "d.jsonl:3: messages: chat records need --template chat"),
    ({"messages": []}, None, False, "d.jsonl:3: messages: expected a non-empty list"),
    ({"messages": ["hi"]}, None, False, r"d.jsonl:3: messages\[0\]: expected"),
    ({"messages": [{"role": "user"}]}, None, False, r"d.jsonl:3: messages\[0\].content: missing"),
    ({"messages": [{"role": "robot", "content": "x"}]}, None, False, r"d.jsonl:3: messages\[0\].role: 'robot' is not one of"),
    ({"messages": [{"role": "user", "content": "質問"}]}, None, False, "d.jsonl:3: messages: no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "答え"}]}, None, False, "d.jsonl:3: messages: no user turn"),
    ({"messages": CHAT["messages"] + [{"role": "user", "content": "もう一つ"}]}, "chat", True,
     "d.jsonl:3: messages: the last turn must be the assistant's"),
])
def test_training_records_that_fail_name_line_and_field(record, template, reference_last, message):
    with pytest.raises(InputError, match=message):
        check_training_record(record, 3, "d.jsonl", template, reference_last)


def test_the_validator_is_the_checker_for_one_file():
    validate = training_record_validator("f.jsonl", template="chat")
    validate({"instruction": "x", "output": "y"}, 1)
    with pytest.raises(InputError, match="f.jsonl:7: messages: no user turn"):
        validate({"messages": [{"role": "assistant", "content": "x"}]}, 7)


def test_finetune_mix_and_eval_share_the_checker(tmp_path):
    """One definition: a conversation without a user turn fails the same way in all three."""
    from pipeline import eval as ev
    from pipeline import finetune, mix

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "答えだけ"}]}, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    for load in (lambda: finetune.load_training_records(bad, "auto"), lambda: mix.load_source(bad),
                 lambda: ev.load_eval_records(ev.Config(data=str(bad)))):
        with pytest.raises(InputError, match=r"bad.jsonl:1: messages: no user turn"):
            load()


def test_train_settings_read_the_nested_and_the_flat_form(tmp_path):
    assert train_settings(tmp_path) == {}
    (tmp_path / TRAIN_CONFIG).write_text(json.dumps({"stage": "finetune", "config": {"template": "chat", "max_length": 64,
                                                                                       "lr": 1e-4}}))
    assert train_settings(tmp_path) == {"template": "chat", "max_length": 64}
    (tmp_path / TRAIN_CONFIG).write_text(json.dumps({"template": "alpaca"}))
    assert train_settings(tmp_path) == {"template": "alpaca"}
    (tmp_path / TRAIN_CONFIG).write_text("[1, 2]")
    with pytest.raises(UserError, match="train_config.json: expected a JSON object"):
        train_settings(tmp_path)
    (tmp_path / TRAIN_CONFIG).write_text("{not json")
    with pytest.raises(UserError, match="train_config.json: not readable JSON"):
        train_settings(tmp_path)
