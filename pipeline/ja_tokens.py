"""Japanese tokens for near-duplicate search: the task a request names, not the frame around it.

`pipeline.similarity.tokenize(text, "multilingual")` sends text with kana here (after NFKC and
lowercase); the filter, `generate` and `mix` then score it with ROUGE-L F1 like English.

Why not one token per character. Japanese requests share a long frame: 「次の…を…してください。」
is two thirds of 「次の文章を要約してください。」. Scored per character, distinct tasks in that frame
look alike (英語で要約 vs 一文で要約: 0.875; 「次のSQLの誤りを直してください」 vs 「次の文の誤字・脱字を
直してください」: 0.73) and the 0.7 threshold drops them, while their English translations
survive. So, per sentence (split at 。！？!?, line breaks and a colon before an input):

1. MeCab (IPAdic, the dictionary sacrebleu's ja-mecab BLEU uses) splits it into morphemes.
2. The request frame goes: a leading 次の / 以下の / 下記の / 上記の / 下の / これらの / この, and
   the request ending, morpheme by morpheme from the end while each is one (ENDING_MORPHEMES:
   して・しなさい・せよ・しろ・てください・て下さい・てくれる？・てほしい・ですか・ましょう...). A text that
   is nothing but frame keeps its tokens.
3. Each morpheme becomes its reading in hiragana, so kanji/kana variants are one form (ことわざ
   = 諺, 子ども = 子供, ひらがな = 平仮名, 付ける = つける); full/half width is one form by NFKC.
4. The readings run together between punctuation, and each run becomes character bigrams
   (a run of one character is one token). A different two-kanji word then changes about four
   tokens, as a different word changes one token of a short English request, so one changed
   word in a short request no longer looks like a copy. Non-Japanese morphemes (SQL, Python,
   50) are tokens of their own, as in the `multilingual` tokenizer.

Measured on tests/fixtures/ja_near_duplicates.jsonl, pairs written by hand for this: 72
`tuning` pairs written before any rule was tried (36 near-duplicates that differ in frame,
ending, register, kanji/kana, width or light wording; 36 distinct tasks in the same frame) and
24 `held_out` pairs (12 + 12) written after the rule was chosen, on which nothing was changed.
A pair is called a near-duplicate when ROUGE-L F1 > 0.7 (the filter's default threshold);
`.venv/bin/python bench/bench_ja_pairs.py` prints this table (precision / recall):

    rule                                       tuning (72)     held out (24)   all (96)
    one token per character (the old rule)     0.607 / 0.944   0.632 / 1.000   0.613 / 0.958
    readings in bigrams, frame kept            0.694 / 0.944   0.750 / 0.750   0.705 / 0.896
    per character, frame stripped              0.761 / 0.972   0.786 / 0.917   0.767 / 0.958
    surface bigrams, frame stripped            0.935 / 0.806   0.889 / 0.667   0.925 / 0.771
    MeCab words, frame stripped                0.738 / 0.861   0.643 / 0.750   0.714 / 0.833
    readings in bigrams, frame stripped (this) 0.972 / 0.972   0.909 / 0.833   0.957 / 0.938

So the old rule calls about one distinct same-frame pair in two a duplicate; this one about
one in twenty, and still catches 45 of 48 near-duplicates (the held-out set, smaller and not
tuned on, is the fairer estimate). What it misses: paraphrases that change a content word
(高さ / 標高, 作って / 作成して, kanji numerals 三百 / 300, a reworded clause), and distinct pairs
that differ in one word inside a long shared sentence (人名 / 地名 をすべて抜き出して, 主張を
まとめて / 主張に反論して), which the English rule also calls duplicates. Homophones share a
reading (科学 / 化学). Cost: about 70 µs per short Japanese request on one core, four times the
per-character tokens (a million Japanese instructions: about a minute more, once, since the
index tokenizes each text once); ASCII text never reaches MeCab.
"""

from __future__ import annotations

import re

from pipeline.errors import UserError

# Morphemes (IPAdic part of speech, base form) that make up a request's ending: removed from
# the end of each sentence while the sentence still has something before them.
ENDING_MORPHEMES = frozenset({
    ("助詞", "て"), ("助詞", "で"), ("助詞", "か"), ("助詞", "よ"), ("助詞", "ね"),
    ("助動詞", "ます"), ("助動詞", "です"), ("助動詞", "う"),
    ("動詞", "する"), ("動詞", "くださる"), ("動詞", "下さる"), ("動詞", "なさる"), ("動詞", "くれる"),
    ("動詞", "もらえる"), ("動詞", "もらう"), ("動詞", "いただける"), ("動詞", "いただく"), ("動詞", "頂く"),
    ("形容詞", "ほしい"), ("形容詞", "欲しい"), ("名詞", "ちょうだい"),
})
# A request's opening: one of these nouns followed by の, or the determiner この.
FRAME_HEAD_NOUNS = frozenset({"次", "つぎ", "以下", "下記", "上記", "下", "これら"})
FRAME_HEAD_DETERMINERS = frozenset({"この"})

# Sentences end at these (a newline is made one before parsing); each has its own ending. A
# colon ends the request before an input it carries (「…訳してください: The library…」).
_SENTENCE_ENDS = frozenset("。．！？!?:：")
_JAPANESE_RE = re.compile(r"[\u3041-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff々〆〇]")
_KANA_RE = re.compile(r"[\u3041-\u30ff]")  # hiragana and katakana (ー included)
_NEWLINES_RE = re.compile(r"[\r\n]+")
# Katakana to hiragana: the two blocks are 0x60 apart (ァ..ヶ to ぁ..ゖ).
_TO_HIRAGANA = {code: code - 0x60 for code in range(0x30A1, 0x30F7)}
_SYMBOL = "記号"
# MeCab writes one line per morpheme: surface, part of speech, base form and reading (IPAdic's
# columns 0, 6 and 7), so the splitting happens in C; an unknown word is its own base and reading.
_NODE_FORMAT = r' -F"%m\t%f[0]\t%f[6]\t%f[7]\n" -U"%m\t%f[0]\t%m\t%m\n" -E"EOS\n"'
_NO_VALUE = ("", "*")
_tagger = None

Morpheme = tuple[str, str, str, str]  # surface, part of speech, base form, reading


def has_kana(text: str) -> bool:
    return _KANA_RE.search(text) is not None


def _mecab():
    global _tagger
    if _tagger is None:
        try:
            import ipadic  # the same dictionary as sacrebleu's ja-mecab BLEU
            import MeCab
        except ImportError as e:  # a dependency in pyproject.toml; only a partial install lacks it
            raise UserError(f"Japanese near-duplicate tokens need MeCab and IPAdic ({e.name} is missing): "
                            "pip install mecab-python3 ipadic") from None
        _tagger = MeCab.Tagger(ipadic.MECAB_ARGS + _NODE_FORMAT)
    return _tagger


def hiragana(text: str) -> str:
    return text.translate(_TO_HIRAGANA)


def sentences(text: str) -> list[list[Morpheme]]:
    """The text's morphemes, per sentence; a reading or base form IPAdic lacks is the surface."""
    out: list[list[Morpheme]] = [[]]
    for line in _mecab().parse(_NEWLINES_RE.sub("。", text)).split("\n"):
        fields = line.split("\t")
        if len(fields) != 4:  # "EOS" and the empty last line
            continue
        surface, pos, base, reading = fields
        if pos == _SYMBOL and surface and all(ch in _SENTENCE_ENDS for ch in surface):
            out.append([])
            continue
        out[-1].append((surface, pos, surface if base in _NO_VALUE else base,
                        surface if reading in _NO_VALUE else reading))
    return [sentence for sentence in out if sentence]


def strip_frame(sentence: list[Morpheme], first: bool) -> list[Morpheme]:
    """The sentence without its request ending and, for the first sentence, its opening (module doc)."""
    end = len(sentence)
    while end and sentence[end - 1][1] == _SYMBOL:
        end -= 1
    while end > 1 and (sentence[end - 1][1], sentence[end - 1][2]) in ENDING_MORPHEMES:
        end -= 1
    start = 0
    if first and end > 2 and sentence[0][2] in FRAME_HEAD_NOUNS and sentence[1][2] == "の":
        start = 2
    elif first and end > 1 and sentence[0][2] in FRAME_HEAD_DETERMINERS:
        start = 1
    return sentence[start:end]


def _bigrams(run: str) -> list[str]:
    return [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]


def japanese_tokens(text: str, other_tokens, strip: bool = True) -> list[str]:
    """Tokens of `text` (NFKC, lowercase, with kana); `other_tokens(s)` splits non-Japanese pieces.
    `strip=False` keeps the frame (only to measure what stripping it is worth)."""
    parsed = sentences(text)
    stripped = [strip_frame(s, i == 0) for i, s in enumerate(parsed)] if strip else parsed
    if not any(stripped):
        stripped = parsed  # nothing but a frame: compare it as written
    tokens: list[str] = []
    for sentence in stripped:
        run: list[str] = []
        for surface, pos, _, reading in sentence:
            if pos != _SYMBOL and _JAPANESE_RE.search(surface):
                run.append(reading)
                continue
            if run:
                tokens += _bigrams(hiragana("".join(run)))
                run = []
            if pos != _SYMBOL:
                tokens += other_tokens(surface)
        if run:
            tokens += _bigrams(hiragana("".join(run)))
    return tokens
