"""Which language a text is in, as far as the pipeline cares: Japanese (or other CJK) or not.

Length limits, few-shot selection, BLEU tokenization and report statistics all need to know
whether words are separated by spaces. A character-class count answers that exactly enough
and needs no model.
"""

import unicodedata

# A text counts as Japanese when at least this share of its letters are kana or kanji:
# English sentences quoting one Japanese word stay English.
CJK_SHARE_FOR_JAPANESE = 0.2


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


def cjk_share(text: str) -> float:
    """Share of the letters in `text` that are CJK characters (0.0 for a text with no letters)."""
    letters = [ch for ch in text if unicodedata.category(ch)[0] in ("L", "N")]
    if not letters:
        return 0.0
    return sum(is_cjk_char(ch) for ch in letters) / len(letters)


def language_of(text: str) -> str:
    """'ja' for Japanese (and other space-less CJK) text, 'en' for everything else."""
    return "ja" if cjk_share(text) >= CJK_SHARE_FOR_JAPANESE else "en"


def text_length(text: str) -> int:
    """Words for space-separated text, characters (without spaces) for Japanese."""
    if language_of(text) == "ja":
        return sum(1 for ch in text if not ch.isspace())
    return len(text.split())
