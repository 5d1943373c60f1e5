"""The named instruction checks that drop what a text-only model cannot use. Pure functions.

Two stages apply the same rules, so they live here, below both: `filter` runs them on a whole
file before its ROUGE-L pass (`python -m pipeline filter`, `--no-heuristics` turns them off),
and `generate` runs them online on every parsed candidate before it may join the pool
(`python -m pipeline generate`, same flag). No check rejects non-ASCII text.

Reason codes, in the order they are tried:
`too_short`, `too_long` (words for space-separated text, characters for Japanese),
`blacklist` (needs images, files, audio...), `program_prefix` ("Write a program..."),
`punctuation_start`, `seed_copy` (the same text as a seed after `fold_width_case_space`).
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

from pipeline.lang import SPACELESS_LANGUAGES, language_of, text_length

# Self-Instruct / Alpaca keep instructions of 4..150 words: shorter ones are rarely a whole
# task, longer ones rarely a single task.
MIN_WORDS = 3  # too short when at most this many words
MAX_WORDS = 150  # too long when more than this many words
# Japanese has no spaces; about two characters make a word, so the same limits in characters.
MIN_CHARS_JA = 6
MAX_CHARS_JA = 300

# Tasks a text-only model cannot do (Alpaca's list). English words match whole words, any case.
BLACKLIST_EN = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
# Japanese has no spaces. Katakana words match whole (not next to other katakana), so グラフ is
# not found inside パラグラフ (paragraph) nor ファイル inside プロファイル (profile). Kanji nouns
# match inside compounds, as Alpaca's English words do inside noun phrases (画像生成 is "image
# generation"); bare 図 is not listed: it is also inside 意図 (intent) and 図書館 (library).
BLACKLIST_JA = ("画像", "写真", "図を描", "図を作", "図示", "図表", "図解", "地図", "グラフ", "動画", "ビデオ", "音声", "音楽",
                "ファイル", "フローチャート", "ダイアグラム", "プロット")
# The verb 描く (draw) in the forms a request uses: 描く, 描いて, 描き(なさい), 描け, 描こう, 描かないで.
# Not 描いた / 描かれた, which talk about a picture or a text that exists (ゴッホが描いた絵, 小説に
# 描かれた時代); not the second half of 思い描く / 想い描く (imagine: the い before it) nor 心に・胸に・
# 頭に・脳裏に描く (picture in one's mind); not inside a kanji compound (素描, 絵描き).
BLACKLIST_JA_VERB = r"(?<![い{kanji}])(?<!心に)(?<!胸に)(?<!頭に)(?<!裏に)描(?:く|け|こう|か(?!れ)|き|いて)"
PROGRAM_PREFIXES = ("write a program", "プログラムを書")

HEURISTIC_REASONS = ("too_short", "too_long", "blacklist", "program_prefix", "punctuation_start", "seed_copy")

_BLACKLIST_EN_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in BLACKLIST_EN) + r")\b", re.IGNORECASE)
# Character classes of the two scripts whose words run together (after NFKC, so no half-width kana).
_KANJI = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff々〆〇"
_KATAKANA = "\u30a1-\u30faー"


def _japanese_word(word: str) -> str:
    """`word` as a regex: katakana words whole (see BLACKLIST_JA), others as written."""
    if re.fullmatch(f"[{_KATAKANA}]+", word):
        return f"(?<![{_KATAKANA}]){re.escape(word)}(?![{_KATAKANA}])"
    return re.escape(word)


_BLACKLIST_JA_RE = re.compile("|".join([_japanese_word(w) for w in BLACKLIST_JA]
                                       + [BLACKLIST_JA_VERB.replace("{kanji}", _KANJI)]))
# Opening quotes and brackets may start a real instruction (「猫」を英訳して); other punctuation not.
_ALLOWED_OPENING = ("Ps", "Pi")


@dataclass(frozen=True)
class HeuristicOptions:
    """Limits of the heuristic checks; `enabled=False` skips them all."""

    enabled: bool = True
    min_words: int = MIN_WORDS
    max_words: int = MAX_WORDS
    min_chars_ja: int = MIN_CHARS_JA
    max_chars_ja: int = MAX_CHARS_JA


def fold_width_case_space(text: str) -> str:
    """The form a seed copy is recognised by: NFKC (full-width as half-width), case-folded,
    every run of whitespace one space, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _starts_with_punctuation(text: str) -> bool:
    first = text[0]
    category = unicodedata.category(first)
    return first in string.punctuation or (category.startswith("P") and category not in _ALLOWED_OPENING)


def heuristic_reason(text: str, seed_forms: set[str], options: HeuristicOptions) -> str | None:
    """The first check that rejects `text` (a code from HEURISTIC_REASONS), or None.

    `seed_forms` holds the seeds' instructions passed through `fold_width_case_space`.
    """
    if not options.enabled:
        return None
    text = text.strip()
    if not text:
        return "too_short"
    japanese = not text.isascii() and language_of(text) in SPACELESS_LANGUAGES  # Chinese too: no spaces
    length = text_length(text) if japanese else len(text.split())
    low, high = (options.min_chars_ja, options.max_chars_ja) if japanese else (options.min_words, options.max_words)
    if length <= low:
        return "too_short"
    if length > high:
        return "too_long"
    folded = fold_width_case_space(text)
    if _BLACKLIST_EN_RE.search(text) or _BLACKLIST_JA_RE.search(folded):
        return "blacklist"
    if folded.startswith(PROGRAM_PREFIXES):
        return "program_prefix"
    if _starts_with_punctuation(text):
        return "punctuation_start"
    if folded in seed_forms:
        return "seed_copy"
    return None
