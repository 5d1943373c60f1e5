"""Which language a text is in, as far as the pipeline cares: `ja`, `zh`, `ko` or `en`.

Length limits, few-shot selection, prompt language, BLEU tokenization and report statistics
all need to know the language of an instruction or answer, and above all whether its words
are separated by spaces. A script count answers that well enough and needs no model.

How `language_of` decides:
- On the request, not on what it quotes or works on: spans in quotes (「」『』“”‘’"" '' «» and
  backticks) are set aside, and so is the input an instruction carries after its first colon,
  line break or 。 (「次の英文を翻訳してください: The library…」 is a Japanese request). When the
  request part says too little (`Q: 日本の首都は？`), the whole text outside quotes decides; when
  nothing is left outside quotes, the whole text does.
- In comparable units: a run of Latin (or other space-separated) letters is one word; Japanese
  and Chinese characters count CJK_CHARS_PER_WORD to a word, so a Japanese request that names
  `Python` or `Web` stays Japanese and an English sentence naming 木漏れ日 stays English.
- Kana (ー, half-width kana and 〆 included) and kanji (々 and 〇 included) are Japanese. CJK text
  with no kana anywhere is `zh` when it has a Chinese mark: a Han character outside JIS X 0208
  (the simplified forms 们, 这, 请: Japanese writes none of them) or a Chinese function word
  (這, 們, 嗎, 你, 个...). Han-only Japanese (a list such as 「人名：山田花子」, 「増加 → 減少」, a
  label such as 肯定) has neither and stays `ja`. A Japanese name in a variant kanji outside JIS
  (髙) in a Han-only text would read as `zh`: rare enough to accept. Hangul is `ko`. Anything
  else with letters, or nothing, is `en`.
"""

from __future__ import annotations

import re
import unicodedata

LANGUAGES = ("en", "ja", "zh", "ko")
# Languages written without spaces: lengths count characters in them, words elsewhere.
SPACELESS_LANGUAGES = frozenset({"ja", "zh"})

# About two Japanese characters make a word (the filter's length limits use the same ratio).
CJK_CHARS_PER_WORD = 2
# The CJK side decides when it holds more than this share of the text's word-equivalents.
CJK_SHARE_FOR_CJK = 0.5
# The request part (before the first colon, line break or 。) decides only when it has at
# least this many word-equivalents; `Q: 日本の首都は？` has one, and the whole text decides.
MIN_REQUEST_WORDS = 3
# Chinese function words that Japanese text without kana does not contain (its particles and
# endings would be kana); 的, 了, 在 and 是 are left out: Japanese compounds use them (目的, 終了).
CHINESE_FUNCTION_CHARS = frozenset("這这們们嗎吗呢吧很說说個个你妳她沒没麼么")
# The codec of JIS X 0208, the kanji set Japanese text is written in; simplified Chinese forms
# are outside it.
JAPANESE_CODEC = "shift_jis"

# Quoted spans set aside before deciding (innermost pairs; an unclosed quote sets nothing aside).
# An ASCII apostrophe quotes only between non-letters, so "don't" stays one word.
_QUOTED_RE = re.compile(r"「[^「」]*」|『[^『』]*』|“[^“”]*”|‘[^‘’]*’|\"[^\"]*\"|«[^«»]*»|`[^`]*`"
                        r"|(?<!\w)'[^'\n]*'(?!\w)")
# Where an instruction's embedded input starts: after the first colon, line break or 。．.
_REQUEST_END_RE = re.compile(r"[:：\n]|(?<=[。．])")
_KANA_MARKS = frozenset("ー〆")
_HAN_MARKS = frozenset("々〇")


def is_cjk_char(ch: str) -> bool:
    """Kana, kanji, hangul and the CJK punctuation/fullwidth blocks: scripts written without spaces."""
    code = ord(ch)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x31F0 <= code <= 0x31FF  # katakana phonetic extensions
        or 0x3400 <= code <= 0x4DBF  # CJK extension A
        or 0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or 0xAC00 <= code <= 0xD7AF  # hangul syllables
        or 0xFF66 <= code <= 0xFF9F  # halfwidth katakana
        or 0x20000 <= code <= 0x2FA1F  # CJK extensions B..F, compatibility supplement
    )


def _script(ch: str) -> str | None:
    """'kana', 'han', 'hangul', 'other' (any other letter) or None (not a letter)."""
    code = ord(ch)
    if ch in _KANA_MARKS or 0x3040 <= code <= 0x309F or 0x30A0 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF \
            or 0xFF66 <= code <= 0xFF9F:
        return "kana" if unicodedata.category(ch)[0] == "L" else None  # ・ and ゠ are punctuation
    if ch in _HAN_MARKS or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF \
            or 0x20000 <= code <= 0x2FA1F:
        return "han"
    if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "hangul"
    return "other" if unicodedata.category(ch)[0] in ("L", "M") else None


def script_counts(text: str) -> dict[str, int]:
    """Kana and Han characters; Hangul and other-letter words (runs of letters of that script)."""
    counts = {"kana": 0, "han": 0, "hangul": 0, "other": 0}
    previous = None
    for ch in text:
        script = _script(ch)
        if script in ("kana", "han"):
            counts[script] += 1
        elif script is not None and script != previous:
            counts[script] += 1  # the first letter of a word
        previous = script
    return counts


def _words(counts: dict[str, int]) -> float:
    return (counts["kana"] + counts["han"]) / CJK_CHARS_PER_WORD + counts["hangul"] + counts["other"]


def _decide(counts: dict[str, int]) -> str:
    total = _words(counts)
    if total == 0:
        return "en"
    if counts["hangul"] / total > CJK_SHARE_FOR_CJK:
        return "ko"
    if (counts["kana"] + counts["han"]) / CJK_CHARS_PER_WORD / total <= CJK_SHARE_FOR_CJK:
        return "en"
    return "ja"


def _is_chinese_mark(ch: str) -> bool:
    if ch in CHINESE_FUNCTION_CHARS:
        return True
    if _script(ch) != "han" or ch in _HAN_MARKS:
        return False
    try:
        ch.encode(JAPANESE_CODEC)
    except UnicodeEncodeError:
        return True
    return False


def looks_chinese(text: str) -> bool:
    """No kana anywhere, and a Chinese mark (module doc)."""
    counts = script_counts(text)
    return counts["kana"] == 0 and any(_is_chinese_mark(ch) for ch in text)


def request_part(text: str) -> str:
    """The text that decides the language: outside quotes, before an embedded input (module doc)."""
    outside = _QUOTED_RE.sub(" ", text)
    if _words(script_counts(outside)) == 0:
        return text
    head = _REQUEST_END_RE.split(outside.strip(), maxsplit=1)[0]
    return head if _words(script_counts(head)) >= MIN_REQUEST_WORDS else outside


def language_of(text: str) -> str:
    """'ja', 'zh', 'ko' or 'en' (everything else) for an instruction or answer (module doc)."""
    language = _decide(script_counts(request_part(text)))
    return "zh" if language == "ja" and looks_chinese(text) else language


def language_in(text: str, supported, fallback: str = "en") -> str:
    """`language_of(text)` when it is one of `supported` (a stage's prompt languages), else `fallback`."""
    language = language_of(text)
    return language if language in supported else fallback


def text_length(text: str) -> int:
    """Words for space-separated text; for Japanese and Chinese, characters without spaces, a
    Latin (or other spaced) word counting CJK_CHARS_PER_WORD, so an English sentence quoted in
    a Japanese request counts as long as its Japanese translation would, not letter by letter."""
    if language_of(text) not in SPACELESS_LANGUAGES:
        return len(text.split())
    length, previous = 0, None
    for ch in text:
        script = None if ch.isspace() else _script(ch)
        if script in ("other", "hangul"):
            length += CJK_CHARS_PER_WORD if script != previous else 0  # a word's first letter
        elif not ch.isspace():
            length += 1
        previous = script
    return length
