"""The named instruction checks shared by `generate` (online) and `filter`, on literal strings."""

from __future__ import annotations

import pytest

from pipeline.heuristics import (MAX_CHARS_JA, MIN_CHARS_JA, MIN_WORDS, HeuristicOptions,
                                 fold_width_case_space, heuristic_reason)
from pipeline.lang import text_length

ON = HeuristicOptions()


SEEDS = {fold_width_case_space("Give three tips for staying healthy.")}


@pytest.mark.parametrize("text, reason", [
    ("Summarize this text.", "too_short"),
    ("word " * 151, "too_long"),
    ("Describe the image below in detail.", "blacklist"),
    ("Draw a picture of a cat for me.", "blacklist"),
    ("Give directions to go to the nearest station.", "blacklist"),
    ("Write a program that sorts a list of numbers.", "program_prefix"),
    ("- List five fruits that are red.", "punctuation_start"),
    ('"Hello" means what in French, exactly?', "punctuation_start"),
    ("give  three tips for staying HEALTHY.", "seed_copy"),
    ("猫", "too_short"),
    ("この画像に写っているものを説明してください。", "blacklist"),
    ("東京の地図を見て、駅までの道を説明してください。", "blacklist"),
    ("プログラムを書いて、数字のリストを並べ替えてください。", "program_prefix"),
    ("。次の文を英語に翻訳してください。", "punctuation_start"),
    ("Explain why the sky is blue during the day.", None),
    ("Explain the mapping between keys and values in a dictionary.", None),  # "map" only as a whole word
    ("次の文章を英語に翻訳してください。", None),  # no check rejects Japanese text
    ("「猫」という単語を英語に翻訳してください。", None),  # an opening quote is a fine start
    ("この文章の意図を説明してください。", None),  # 意図 (intent) contains 図 but is not a figure
    ("Traduisez cette phrase en anglais, s'il vous plaît.", None),
])
def test_heuristic_reasons(text, reason):
    assert heuristic_reason(text, SEEDS, ON) == reason


def test_heuristic_limits_are_options_and_can_be_switched_off():
    assert heuristic_reason("Summarize this text.", SEEDS, HeuristicOptions(min_words=2)) is None
    assert heuristic_reason("Describe the image below.", SEEDS, HeuristicOptions(enabled=False)) is None
    assert heuristic_reason("次の文を訳して", SEEDS, HeuristicOptions(min_chars_ja=8)) == "too_short"


def words(n: int) -> str:
    """An ordinary English instruction of exactly `n` words."""
    base = "Explain in plain words why the tide rises and falls along the coast each day".split()
    return " ".join((base * (n // len(base) + 1))[:n]) + "."


def japanese(n: int) -> str:
    """A Japanese instruction of exactly `n` characters (no spaces)."""
    base = "海岸で毎日潮が満ち引きする理由を分かりやすく説明してください"
    return (base * (n // len(base) + 1))[:n]


@pytest.mark.parametrize("make, length, reason", [
    (words, 150, None),  # the longest kept: Self-Instruct keeps 4..150 words
    (words, 151, "too_long"),
    (words, MIN_WORDS, "too_short"),  # 3 words is too short
    (words, MIN_WORDS + 1, None),
    (japanese, MAX_CHARS_JA, None),
    (japanese, MAX_CHARS_JA + 1, "too_long"),
    (japanese, MIN_CHARS_JA, "too_short"),
    (japanese, MIN_CHARS_JA + 1, None),
])
def test_length_limits_are_inclusive_at_the_top_and_exclusive_at_the_bottom(make, length, reason):
    text = make(length)
    assert text_length(text) == length
    assert heuristic_reason(text, set(), ON) == reason


def test_the_seed_copy_form_ignores_width_case_and_spacing():
    assert fold_width_case_space("  Give THREE\ttips.  ") == "give three tips."
    assert fold_width_case_space("ＡＢＣ　を　説明して") == "abc を 説明して"  # full-width letters and space
    assert heuristic_reason("ｇｉｖｅ three tips for staying healthy.", SEEDS, ON) == "seed_copy"
    assert heuristic_reason("健康を保つための　方法を三つ挙げてください。", {fold_width_case_space("健康を保つための 方法を三つ挙げてください。")},
                            ON) == "seed_copy"


@pytest.mark.parametrize("text, reason", [
    # The verb 描く in its own forms is a drawing request...
    ("猫の絵を描いてください。", "blacklist"),
    ("好きな動物のイラストを描く方法を教えて、実際に一枚描きなさい。", "blacklist"),
    ("紙に家の間取りを描いてください。", "blacklist"),
    # ...but 思い描く / 心に描く is "imagine", and 描いた / 描かれた talk about what exists.
    ("十年後の自分を思い描いて、その姿を三文で書いてください。", None),
    ("理想の休日を心に描き、それを日記の形で書いてください。", None),
    ("この小説に描かれた時代背景を説明してください。", None),
    ("ゴッホが描いた『ひまわり』について簡単に説明してください。", None),
    # Katakana words match whole: グラフ is not inside パラグラフ, ファイル not inside プロファイル.
    ("次のパラグラフの要点を一文でまとめてください。", None),
    ("就職活動用のプロファイル文を二百字で書いてください。", None),
    ("次のデータから棒グラフを作ってください。", "blacklist"),
    # English: whole words only.
    ("Describe the image below in detail.", "blacklist"),
    ("Imagine you are a cat and describe your day.", None),
    ("Explain how a profile picture affects first impressions.", "blacklist"),
    ("Write a short profile of a famous scientist.", None),
])
def test_blacklist_matches_words_and_the_verbs_own_forms(text, reason):
    assert heuristic_reason(text, SEEDS, ON) == reason
