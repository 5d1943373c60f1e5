"""pipeline/lang.py: which language a request is in, and lengths in the right unit."""

import pytest

from pipeline.lang import (CJK_CHARS_PER_WORD, is_cjk_char, language_in, language_of, request_part, script_counts,
                           text_length)


@pytest.mark.parametrize("text, language", [
    ("Write a short poem about the sea.", "en"),
    ("Où se trouve la gare la plus proche ?", "en"),
    ("次の文章を一文で要約してください。", "ja"),
    ("カタカナだけ", "ja"),
    ("ひらがなだけ", "ja"),
    ("PythonでWebアプリを作る方法を教えてください。", "ja"),  # Latin words inside Japanese stay Japanese
    ("次のJavaScriptのコードをTypeScriptに書き換えてください。", "ja"),
    ("Explain what the Japanese word 木漏れ日 means in English and give an example.", "en"),
    ("", "en"),
    ("12345 !!!", "en"),
])
def test_language_of(text, language):
    assert language_of(text) == language


@pytest.mark.parametrize("text", [
    # The case: the request is Japanese, the English after the colon is its input.
    "次の英文を翻訳してください: The library is open from nine to five on weekdays.",
    "次の英文を日本語に訳してください。The library is open from nine to five on weekdays, and it is closed on holidays.",
    "次の英文を自然な日本語に訳してください。\nThe library is open from nine to five on weekdays.",
    # Quoted English is what the task works on, not the language it is asked in.
    "「The quick brown fox jumps over the lazy dog and runs away」を日本語に訳してください。",
    "“Actions speak louder than words” ということわざの意味を説明して。",
    "『Harry Potter and the Philosopher's Stone』のあらすじを三行で書いてください。",
    "Q: 日本の首都はどこですか？",  # a one-word request part: the whole text decides
])
def test_japanese_requests_quoting_english_are_japanese(text):
    assert language_of(text) == "ja"


@pytest.mark.parametrize("text", [
    "Translate to English: 吾輩は猫である。名前はまだ無い。",
    "Translate \"猫が好きです\" into English.",
    "What does 「一期一会」 mean?",
])
def test_english_requests_quoting_japanese_are_english(text):
    assert language_of(text) == "en"


def test_latin_script_counts_words_not_letters():
    # A long English word is one word, not eleven letters: three Japanese characters (one and
    # a half words) outweigh it, and an English sentence naming one kanji word stays English.
    assert script_counts("Programmingを学ぶ") == {"kana": 2, "han": 1, "hangul": 0, "other": 1}
    assert language_of("Programmingを学ぶ") == "ja"
    assert CJK_CHARS_PER_WORD == 2
    assert language_of("abcd漢") == "en"  # one word against half a word


@pytest.mark.parametrize("text", ["佐々木さんに連絡して", "〆切を確認して", "〇か×で答えて", "時々雨"])
def test_iteration_and_closing_marks_count_as_japanese(text):
    counts = script_counts(text)
    assert counts["kana"] + counts["han"] == sum(1 for ch in text if not ch.isspace() and ch != "×")
    assert language_of(text) == "ja"


def test_marks_alone_are_japanese_letters():
    assert script_counts("々〆〇ー") == {"kana": 2, "han": 2, "hangul": 0, "other": 0}


@pytest.mark.parametrize("text, language", [
    ("오늘은 날씨가 좋네요.", "ko"),
    ("다음 문장을 영어로 번역하세요.", "ko"),
    ("今天天气很好，我们去公园吧。", "zh"),  # simplified forms outside JIS X 0208
    ("這是一本書。", "zh"),  # traditional, every character in JIS: the function word 這 decides
    ("请把这句话翻译成英文。", "zh"),
    ("用Python写一个排序程序。", "zh"),
    # Han-only Japanese stays Japanese: a list, an antonym table, a label, a sum.
    ("人名：山田花子、鈴木一郎\n日付：4月12日、5月1日", "ja"),
    ("増加 → 減少\n安全 → 危険", "ja"),
    ("肯定", "ja"),
    ("東京", "ja"),
    ("合計：72 + 85 = 157点", "ja"),
])
def test_korean_and_chinese_are_labelled_honestly(text, language):
    assert language_of(text) == language


def test_request_part_sets_quotes_and_inputs_aside():
    assert request_part("次の英文を翻訳してください: The library is open.") == "次の英文を翻訳してください"
    assert "fox" not in request_part("「The quick brown fox」を訳して")
    assert request_part("「only a quote」") == "「only a quote」"  # nothing outside: the whole text decides
    assert "don't" in request_part("Explain why people don't sleep well, in two sentences.")


def test_language_in_falls_back_for_languages_without_prompts():
    assert language_in("次の文章を要約して", ("en", "ja")) == "ja"
    assert language_in("오늘은 날씨가 좋네요.", ("en", "ja")) == "en"
    assert language_in("今天天气很好，我们去公园吧。", ("en", "ja"), fallback="ja") == "ja"


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
    assert text_length("오늘은 날씨가 좋네요.") == 3  # Korean separates words with spaces


def test_text_length_counts_characters_in_japanese_and_chinese():
    assert text_length("今日は晴れ") == 5
    assert text_length("今日は 晴れ\n") == 5  # spaces and newlines do not count
    assert text_length("AIについて") == 6
    assert text_length("今天天气很好。") == 7
    assert text_length("PythonでWebアプリを作る方法") == 2 + 1 + 2 + 8  # a Latin word counts two characters
    # A long English input inside a Japanese request counts by words, not letters.
    request = "次の英文を要約してください: " + "The library is open from nine to five on weekdays. " * 6
    assert language_of(request) == "ja"
    assert text_length(request) == len("次の英文を要約してください:") + 6 * (10 * CJK_CHARS_PER_WORD + 1)
