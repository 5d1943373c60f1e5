"""The Japanese a user and a model read: convert's phrasings (pipeline/convert_phrasings.py),
`--labels` split on 「、」 too, and generate's Japanese prompt files (pipeline/prompt_files/*_ja.txt)."""

import re

import pytest

from conftest import write_jsonl
from pipeline import convert, convert_phrasings
from pipeline.errors import UserError
from pipeline.jsonl import load_records
from pipeline.prompts import build_alpaca_prompt, build_self_instruct_prompt, load_prompt_file, prompt_file_path

MODES = ("self-instruct", "alpaca")
APIS = ("chat", "completions")
# Phrasings a Japanese reader flagged as translated from English; none may come back.
TRANSLATIONESE = ("動詞を変え", "動詞と話題を変え", "完全で良い答え", "互いとも違う", "互いに異なり", "ではどう言いますか", "これらのカテゴリ",
                  "カテゴリを次から", "候補: {labels}")
# A slot in a prompt template, as pipeline.prompts.render fills it.
_SLOT = re.compile(r"\{(examples|num_examples|next_number|last_number|num_new)\}")
# A formal request ends like this; a casual one (〜して。〜してくれる？ 〜のどれに入る？) does not.
_FORMAL_END = re.compile(r"(ください|ますか)[。？]$")


@pytest.mark.parametrize("text, labels", [
    ("肯定、否定", ["肯定", "否定"]),
    ("肯定，否定,中立", ["肯定", "否定", "中立"]),
    ("pos, neg", ["pos", "neg"]),
    (" 高 ､ 中 、、低 ", ["高", "中", "低"]),
    ("、 ,", []),
    (None, []),
])
def test_labels_split_on_commas_and_the_japanese_comma(text, labels):
    assert convert_phrasings.split_labels(text) == labels


def test_convert_with_japanese_labels_keeps_every_row(tmp_path):
    rows = [{"text": "音がクリアで、買ってよかったです。", "label": "肯定"},
            {"text": "届いた時には電源が入りませんでした。", "label": "否定"}]
    src, out = write_jsonl(tmp_path / "reviews.jsonl", rows), tmp_path / "out.jsonl"
    # `--labels 肯定、否定` as typed on a Japanese keyboard: two labels, so no row is "not in --labels".
    stats = convert.run(convert.Config(kind="classification", in_path=str(src), out=str(out), labels="肯定、否定"))
    assert stats.converted == 2 and not stats.skipped
    records = load_records(out)
    assert [r["output"] for r in records] == ["肯定", "否定"]
    assert all("肯定、否定" in r["instruction"] and r["language"] == "ja" for r in records)


def test_only_separators_in_labels_is_a_user_error():
    with pytest.raises(UserError, match="--labels: .*、"):
        convert.Config(kind="classification", in_path="x.csv", labels="、、")


def test_japanese_phrasings_read_as_japanese():
    for kind, by_language in convert_phrasings.INSTRUCTIONS.items():
        phrasings = by_language["ja"]
        for text in phrasings:
            assert not [bad for bad in TRANSLATIONESE if bad in text], text
            # The label list belongs inside the sentence (「肯定、否定のいずれかに」), not after a colon.
            assert not re.search(r"[:：]\s*\{", text), text
        assert any(not _FORMAL_END.search(text) for text in phrasings), f"{kind}: no casual phrasing"
        assert len({text[:4] for text in phrasings}) >= 3, f"{kind}: phrasings start alike"


def test_japanese_classification_phrasing_with_labels_filled_in():
    labels = convert_phrasings.LABEL_SEPARATOR["ja"].join(["肯定", "否定"])
    filled = [text.format(labels=labels) for text in convert_phrasings.INSTRUCTIONS["classification"]["ja"]]
    assert filled[0] == "次の文章を、肯定、否定のいずれかに分類してください。"
    assert all("肯定、否定" in text for text in filled)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_japanese_prompt_files_keep_the_english_slots_and_drop_translationese(mode, api):
    japanese = load_prompt_file(mode, api, "ja")
    english = load_prompt_file(mode, api, "en")
    assert set(_SLOT.findall(japanese)) == set(_SLOT.findall(english))
    assert not [bad for bad in TRANSLATIONESE if bad in japanese]
    if api == "completions":  # where a completion prompt stops is where the model goes on: as in English
        assert japanese.rstrip("\n").endswith(english.rstrip("\n").rsplit("\n", 1)[-1].replace("Instruction", "指示"))
    if mode == "self-instruct":
        assert "依頼" in japanese  # the word for a request a person makes, which generate's tests look for


@pytest.mark.parametrize("mode", MODES)
def test_japanese_chat_prompts_ask_for_varied_register_and_japanese_life(mode):
    text = prompt_file_path(mode, "chat", "ja").read_text(encoding="utf-8")
    assert "口調" in text and "〜してくれる？" in text  # casual requests are asked for by example
    assert re.search("日本(で暮らす|の暮らし)", text)  # tasks set in Japanese life


def test_rendered_japanese_prompts_fill_every_slot():
    self_instruct = build_self_instruct_prompt(load_prompt_file("self-instruct", "chat", "ja"),
                                               ["次の文章を要約してください。", "この英文、訳してくれる？"], 3)
    assert "3番から5番まで、新しい依頼を3個" in self_instruct and not _SLOT.search(self_instruct)
    alpaca = build_alpaca_prompt(load_prompt_file("alpaca", "completions", "ja"),
                                 [("和暦を西暦に直して。", "平成12年", "2000年")], 2, "ja")
    assert alpaca.rstrip("\n").endswith("###\n2. 指示:") and not _SLOT.search(alpaca)
