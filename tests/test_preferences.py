"""Preference pair and label records: the two TRL forms, the checker's one-line errors, apply_labels."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.errors import InputError, UserError
from pipeline.preferences import (HUMAN_TIE, agreement, apply_labels, check_label, check_pair, judge_order,
                                  labels_path_for, load_pairs, make_label, make_pair, pair_format, pair_key,
                                  question_text, swapped, training_records)
from pipeline.templates import alpaca_prompt
from tests.conftest import write_jsonl

TIME = "2026-01-01T00:00:00+00:00"


def ja_pair(fmt="alpaca", pair_id="ja-1"):
    return make_pair(pair_id, "日本の首都はどこですか。", "一言で答えてください。", "東京です。", "大阪です。", fmt=fmt,
                     scores={"chosen": 4.5, "rejected": 2.0}, reasons={"chosen": "正しい。", "rejected": "誤り。"},
                     models={"policy": "runs/sft", "judge": "judge-model"})


def en_pair(pair_id="en-1", fmt="alpaca"):
    return make_pair(pair_id, "Name the capital of France.", "", "Paris.", "Lyon.", fmt=fmt,
                     scores={"chosen": 5, "rejected": 1}, reasons={"chosen": "right", "rejected": "wrong"})


def test_standard_form_is_trl_prompt_chosen_rejected_with_the_alpaca_prompt():
    pair = ja_pair()
    assert pair["prompt"] == alpaca_prompt({"instruction": "日本の首都はどこですか。", "input": "一言で答えてください。"})
    assert pair["prompt"].endswith("### Response:")
    assert (pair["chosen"], pair["rejected"]) == ("東京です。", "大阪です。")
    assert pair["scores"] == {"chosen": 4.5, "rejected": 2.0} and pair["margin"] == 2.5
    assert pair["label_source"] == "judge" and pair_format(pair) == "alpaca"
    check_pair(pair, 1, "x.jsonl")


def test_conversational_form_is_one_user_turn_and_one_assistant_turn_each():
    pair = ja_pair("messages")
    assert pair["prompt"] == [{"role": "user", "content": "日本の首都はどこですか。\n\n一言で答えてください。"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "東京です。"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "大阪です。"}]
    assert pair_format(pair) == "messages"
    check_pair(pair, 1, "x.jsonl")
    with pytest.raises(ValueError, match="unknown pair format"):
        make_pair("x", "a", "", "b", "c", fmt="sharegpt")


@pytest.mark.parametrize("fmt", ["alpaca", "messages"])
def test_pairs_load_in_datasets_with_japanese_intact(tmp_path, fmt):
    from datasets import load_dataset

    path = write_jsonl(tmp_path / "preferences.jsonl", [ja_pair(fmt), en_pair(fmt=fmt)])
    assert [p["chosen"] for p in load_pairs(path)] == [ja_pair(fmt)["chosen"], en_pair(fmt=fmt)["chosen"]]
    rows = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert {"prompt", "chosen", "rejected"} <= set(rows.column_names)
    assert rows[0]["chosen"] == ja_pair(fmt)["chosen"] and rows[0]["instruction"] == "日本の首都はどこですか。"


BAD_PAIRS = [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "id: missing"),
    ({"id": "x", "chosen": "a", "rejected": "b"}, "prompt: missing"),
    ({"id": "x", "prompt": "p", "chosen": "a"}, "rejected: missing"),
    ({"id": "x", "prompt": "p", "chosen": 3, "rejected": "b"}, "chosen: expected a string or a list"),
    ({"id": "x", "prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     "chosen: expected a string, as prompt is"),
    ({"id": "x", "prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"},
     "chosen: expected a list of assistant turns"),
    ({"id": "x", "prompt": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "q"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "prompt: the last turn must be the user's"),
    ({"id": "x", "prompt": [{"role": "human", "content": "p"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "prompt[0].role: 'human' is not one of"),
    ({"id": "x", "prompt": [{"role": "user", "content": "p"}],
      "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "chosen[0].role: 'user' is not one of assistant"),
    ({"id": "x", "prompt": [{"role": "user", "content": "p"}],
      "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "chosen[0].content: missing"),
    ({"id": "x", "prompt": "p", "chosen": "東京です。", "rejected": "東京です。"}, "rejected: the same answer as chosen"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "scores": {"chosen": "5", "rejected": 1}},
     "scores.chosen: expected"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "scores": {"chosen": 5}}, "scores.rejected: missing"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, "margin: expected"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "models": {"judge": 7}}, "models.judge: expected a string"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "label_source": "robot"},
     "label_source: 'robot' is not one of judge, human"),
    ({"id": "x", "prompt": "", "chosen": "a", "rejected": "b"}, "prompt: empty"),
]


@pytest.mark.parametrize("record, says", BAD_PAIRS)
def test_a_bad_pair_is_one_error_naming_file_line_and_field(tmp_path, record, says):
    path = write_jsonl(tmp_path / "p.jsonl", [en_pair(), record])
    with pytest.raises(InputError) as caught:
        load_pairs(path)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert says in str(caught.value)


def test_a_duplicate_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [en_pair("same"), ja_pair(pair_id="other"), ja_pair(pair_id="same")])
    with pytest.raises(InputError, match=r"p\.jsonl:3: id: 'same' is also the id of line 1"):
        load_pairs(path)


def test_an_empty_pairs_file_is_a_user_error(tmp_path):
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(UserError, match="no records"):
        load_pairs(tmp_path / "p.jsonl")


def test_labels_file_sits_beside_the_pairs():
    assert str(labels_path_for("data/preferences.jsonl")) == "data/preferences.labels.jsonl"


def test_question_text_falls_back_to_the_prompt_without_an_instruction():
    pair = {"id": 1, "prompt": [{"role": "system", "content": "丁寧に。"}, {"role": "user", "content": "こんにちは"}],
            "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    assert question_text(pair) == ("system: 丁寧に。\n\nuser: こんにちは", "")
    assert question_text(ja_pair()) == ("日本の首都はどこですか。", "一言で答えてください。")


def test_pair_key_changes_when_the_answers_change_or_swap():
    pair = ja_pair()
    assert pair_key(pair) == pair_key(copy.deepcopy(pair))
    assert pair_key(pair) != pair_key(swapped(pair))
    assert pair_key(pair) != pair_key({**pair, "rejected": "京都です。"})
    assert pair_key(pair) == pair_key({**pair, "scores": {"chosen": 1, "rejected": 1}})  # provenance is not content


def label(pair, choice):
    return make_label(pair, choice, "chosen", TIME)


def test_apply_labels_confirms_overrides_drops_ties_and_leaves_skips():
    confirmed, overridden, tied, skipped, unlabelled = (ja_pair(pair_id=f"p{i}") for i in range(5))
    labels = [label(confirmed, "chosen"), label(overridden, "rejected"), label(tied, "tie"), label(skipped, "skip")]
    result = apply_labels([confirmed, overridden, tied, skipped, unlabelled], labels)
    assert [p["id"] for p in result.pairs] == ["p0", "p1", "p3", "p4"]
    kept = {p["id"]: p for p in result.pairs}
    assert kept["p0"]["chosen"] == "東京です。" and kept["p0"]["label_source"] == "human" and kept["p0"]["judge_agreed"]
    # overridden: the person's answer is chosen now; scores and reasons stayed with their answers
    assert (kept["p1"]["chosen"], kept["p1"]["rejected"]) == ("大阪です。", "東京です。")
    assert kept["p1"]["scores"] == {"chosen": 2.0, "rejected": 4.5} and kept["p1"]["margin"] == -2.5
    assert kept["p1"]["reasons"] == {"chosen": "誤り。", "rejected": "正しい。"}
    assert kept["p1"]["label_source"] == "human" and kept["p1"]["judge_agreed"] is False
    assert kept["p3"] == skipped and kept["p4"] == unlabelled  # the judge's pair, untouched
    assert [(d["id"], d["reason"], d["label_source"]) for d in result.dropped] == [("p2", HUMAN_TIE, "human")]
    assert (result.confirmed, result.overridden, result.stale) == (1, 1, 0)
    for record in result.pairs:
        check_pair(record, 1, "out.jsonl")  # what apply_labels gives is still a valid pair


def test_apply_labels_swaps_the_conversational_form_too():
    pair = ja_pair("messages")
    [out] = apply_labels([pair], [label(pair, "rejected")]).pairs
    assert out["chosen"] == [{"role": "assistant", "content": "大阪です。"}]
    assert out["rejected"] == [{"role": "assistant", "content": "東京です。"}]
    assert out["prompt"] == pair["prompt"]


def test_apply_labels_changes_nothing_it_was_given():
    pairs, labels = [ja_pair()], [label(ja_pair(), "rejected")]
    before = copy.deepcopy((pairs, labels))
    apply_labels(pairs, labels)
    assert (pairs, labels) == before


def test_a_stale_label_is_not_applied_and_the_last_label_wins():
    pair = ja_pair()
    old_answers = {**pair, "rejected": "京都です。"}  # labelled before prefs was rerun
    result = apply_labels([pair], [label(old_answers, "rejected")])
    assert result.pairs == [pair] and result.stale == 1
    result = apply_labels([pair], [label(pair, "tie"), label(pair, "rejected")])  # a later session changed its mind
    assert result.pairs[0]["chosen"] == "大阪です。" and not result.dropped
    gone = apply_labels([pair], [label(en_pair("deleted"), "chosen")])
    assert gone.stale == 1 and gone.pairs == [pair]


def test_agreement_counts_only_labels_that_prefer_one_answer():
    pair = en_pair()
    result = agreement([label(pair, c) for c in ("chosen", "chosen", "rejected", "tie", "skip", "skip")])
    assert (result.agreed, result.compared, result.ties, result.skipped) == (2, 3, 1, 2)
    assert result.share == pytest.approx(2 / 3)
    assert agreement([label(pair, "tie")]).share is None


def test_label_records_are_checked():
    good = label(ja_pair(), "tie")
    assert set(good) == {"id", "pair", "choice", "shown_first", "time"} and good["pair"] == pair_key(ja_pair())
    check_label(good, 1, "l.jsonl")
    with pytest.raises(InputError, match=r"l\.jsonl:4: choice: 'maybe' is not one of chosen, rejected, tie, skip"):
        check_label({**good, "choice": "maybe"}, 4, "l.jsonl")
    with pytest.raises(InputError, match=r"l\.jsonl:1: pair: missing"):
        check_label({"id": "x", "choice": "tie"}, 1, "l.jsonl")
    with pytest.raises(ValueError):
        make_label(ja_pair(), "both", "chosen", TIME)


def test_make_pair_round_trips_through_jsonl_unescaped(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [ja_pair()])
    assert "東京です。" in path.read_text(encoding="utf-8")
    assert load_pairs(path) == [json.loads(json.dumps(ja_pair()))]


def test_applying_the_same_labels_again_gives_the_same_pairs():
    pairs = [ja_pair(pair_id="a"), ja_pair(pair_id="b"), ja_pair(pair_id="c")]
    labels = [label(pairs[0], "chosen"), label(pairs[1], "rejected")]
    once = apply_labels(pairs, labels)
    twice = apply_labels(once.pairs, labels)  # e.g. prefs --labels rerun on its own output
    assert twice.pairs == once.pairs and twice.stale == 0 and (twice.confirmed, twice.overridden) == (1, 1)
    # an overridden pair read in the judge's order is the judge's pair again, key and all
    assert judge_order(once.pairs[1]) == pairs[1] and pair_key(once.pairs[1]) == pair_key(pairs[1])


@pytest.mark.parametrize("fmt", ["alpaca", "messages"])
def test_training_records_render_through_the_finetune_templates(tiny_model_dir, fmt):
    from transformers import AutoTokenizer

    from pipeline.templates import IGNORE_INDEX, encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chosen, rejected = training_records(ja_pair(fmt))
    template = "alpaca" if fmt == "alpaca" else "chat"
    encoded = encode_example(chosen, tokenizer, template, max_length=256)
    trained = [token for token, tag in zip(encoded.input_ids, encoded.labels) if tag != IGNORE_INDEX]
    assert "東京です。" in tokenizer.decode(trained) and "日本の首都" not in tokenizer.decode(trained)
    assert training_records(ja_pair(fmt))[1] == rejected
    assert "大阪です。" in str(rejected)


def test_a_standard_pair_without_instruction_cannot_be_rendered():
    with pytest.raises(ValueError, match="needs `instruction`"):
        training_records({"id": "t", "prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
