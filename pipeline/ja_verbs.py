"""The task verb of a Japanese request, in dictionary form: 書いてください -> 書く.

Japanese puts the verb last and inflects it (書い・書き・書け), then adds a request form
(てください, なさい, てくれる？, てほしい). MeCab with IPAdic (installed with `sacrebleu[ja]`)
gives each word's part of speech and dictionary form, so the task verb is the last
independent verb (動詞,自立) of the request, reported as the dictionary lists it; a kanji
noun + する keeps its noun (要約しなさい -> 要約する). Used by `inspect` for the leading-verbs
view (the Self-Instruct paper's Figure 2).
"""

from __future__ import annotations

import re

# Dictionary forms that, after the task verb, make a request of what ends like a question
# (書いてくれる？ is a request; どこにありますか？ is a question):
JA_REQUEST_FORMS = {"くださる", "下さる", "なさる", "くれる", "もらう", "もらえる", "いただく", "いただける", "ほしい", "欲しい"}
# IPAdic feature columns: part of speech, its first subdivision, ..., the dictionary form.
MECAB_POS, MECAB_POS_DETAIL, MECAB_BASE_FORM = 0, 1, 6
# What quotes say is not the request (「肯定」か「否定」で答えて); the request ends at the first
# sentence end, line break or colon (what follows is the material it works on).
JA_QUOTED = re.compile(r"「[^「」]*」|『[^『』]*』")
JA_REQUEST_END = re.compile(r"[。．\n:：]")
JA_QUESTION_END = re.compile(r"(?:[?？]|か[。．]?)\s*$")
_tagger = None


def japanese_words(text: str) -> list[tuple[str, str, str, str]]:
    """(surface, part of speech, its subdivision, dictionary form) of each word, by MeCab + IPAdic."""
    global _tagger
    if _tagger is None:
        import ipadic
        import MeCab

        _tagger = MeCab.Tagger(ipadic.MECAB_ARGS)
    words = []
    node = _tagger.parseToNode(text)
    while node is not None:
        if node.surface:
            features = node.feature.split(",")
            base = features[MECAB_BASE_FORM] if len(features) > MECAB_BASE_FORM and features[MECAB_BASE_FORM] != "*" else node.surface
            words.append((node.surface, features[MECAB_POS], features[MECAB_POS_DETAIL], base))
        node = node.next
    return words


def japanese_task_verb(instruction: str) -> str:
    """The request's task verb in dictionary form: 書いてください -> 書く, 換えて -> 換える,
    要約しなさい -> 要約する (a noun + する keeps its noun); "(question)" for a question
    (日本の首都はどこですか？), "(other)" when the request has no verb."""
    unquoted = JA_QUOTED.sub("「」", instruction.strip())
    request = JA_REQUEST_END.split(unquoted, maxsplit=1)[0].strip() or unquoted
    words = japanese_words(request)
    verbs = [i for i, (_, pos, detail, _) in enumerate(words) if pos == "動詞" and detail == "自立"]
    is_question = bool(JA_QUESTION_END.search(request))
    if not verbs:
        return "(question)" if is_question else "(other)"
    last = verbs[-1]
    if is_question and not any(base in JA_REQUEST_FORMS for _, _, _, base in words[last + 1:]):
        return "(question)"
    base = words[last][3]
    if base == "する" and last > 0 and words[last - 1][1] in ("名詞", "形容詞"):
        return words[last - 1][0] + "する"  # 要約する, 短くする: the word before names the task
    return base
