"""pipeline/lang.py: Japanese vs space-separated text, and lengths in the right unit."""

import pytest

from pipeline.lang import CJK_SHARE_FOR_JAPANESE, cjk_share, is_cjk_char, language_of, text_length


@pytest.mark.parametrize("text, language", [
    ("Write a short poem about the sea.", "en"),
    ("Où se trouve la gare la plus proche ?", "en"),
    ("次の文章を一文で要約してください。", "ja"),
    ("カタカナだけ", "ja"),
    ("ひらがなだけ", "ja"),
    ("PythonでWebアプリを作る方法を教えてください。", "ja"),  # Latin words inside Japanese stay Japanese
    ("Explain what the Japanese word 木漏れ日 means in English and give an example.", "en"),
    ("오늘은 날씨가 좋네요.", "ja"),  # any space-less CJK script counts
    ("", "en"),
    ("12345 !!!", "en"),
])
def test_language_of(text, language):
    assert language_of(text) == language


def test_threshold_is_a_share_of_letters():
    # One CJK character among five letters is exactly the threshold; among six it is below.
    assert CJK_SHARE_FOR_JAPANESE == pytest.approx(0.2)
    assert language_of("abcd漢") == "ja"
    assert language_of("abcde漢") == "en"


def test_cjk_share_ignores_spaces_and_punctuation():
    assert cjk_share("猫!!!   ???") == 1.0
    assert cjk_share("a 猫。") == 0.5
    assert cjk_share("...") == 0.0


@pytest.mark.parametrize("ch, expected", [
    ("あ", True), ("ア", True), ("漢", True), ("ｱ", True), ("한", True),
    ("a", False), ("1", False), ("。", False), ("é", False),
])
def test_is_cjk_char(ch, expected):
    assert is_cjk_char(ch) is expected


def test_text_length_counts_words_in_english():
    assert text_length("Write a short poem") == 4
    assert text_length("  spaced   out\ttext\n") == 3
    assert text_length("") == 0


def test_text_length_counts_characters_in_japanese():
    assert text_length("今日は晴れ") == 5
    assert text_length("今日は 晴れ\n") == 5  # spaces and newlines do not count
    assert text_length("AIについて") == 6
