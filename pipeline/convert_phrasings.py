"""Instruction phrasings for `python -m pipeline convert`, per task kind and language.

A converted dataset where every record starts with the same sentence teaches the model one
sentence, not a task; several phrasings per kind (picked with the stage's seed) keep the
instructions varied while saying the same thing. Placeholders are filled with `str.format`:
`{source}` / `{target}` (language names), `{labels}` (the label list). Keep the English and
Japanese lists the same length so a seed picks the same "slot" in either language.

The Japanese phrasings are written as a Japanese user asks, not translated from the English
ones: the label list sits inside the sentence (「肯定、否定のいずれかに」), not after a colon,
and one phrasing per kind is casual (〜して、〜してくれる？), as real requests often are.
"""

from __future__ import annotations

import re

INSTRUCTIONS: dict[str, dict[str, list[str]]] = {
    "qa": {
        "en": [
            "Answer the question using the passage.",
            "Read the passage and answer the question that follows it.",
            "Using only the information in the passage, answer the question.",
            "Find the answer to the question in the text below.",
            "Answer the question based on the given passage.",
        ],
        "ja": [
            "文章を読んで、質問に答えてください。",
            "次の文章を読み、あとの質問に答えてください。",
            "文章に書かれていることだけを使って、質問に答えてください。",
            "以下の文章から答えを探して、質問に答えてください。",
            "この文章を読んで、最後の質問に答えて。",
        ],
    },
    "translation": {
        "en": [
            "Translate the following text from {source} to {target}.",
            "Translate this {source} text into {target}.",
            "Render the text below in {target}. It is written in {source}.",
            "Give a {target} translation of the following {source} text.",
            "What is the {target} translation of this {source} text?",
        ],
        "ja": [
            "次の文章を{source}から{target}に翻訳してください。",
            "この{source}の文章を{target}に訳してください。",
            "以下の{source}の文を、自然な{target}に訳してください。",
            "次の{source}を{target}にしてください。",
            "この{source}、{target}に訳してくれる？",
        ],
    },
    "classification": {
        "en": [
            "Classify the text into one of these categories: {labels}.",
            "Which of the following labels fits the text best? {labels}.",
            "Assign one label to the text. Possible labels: {labels}.",
            "Read the text and choose its category from: {labels}.",
            "Label the following text as one of: {labels}.",
        ],
        "ja": [
            "次の文章を、{labels}のいずれかに分類してください。",
            "この文章に最も合うものを、{labels}の中から一つ選んでください。",
            "文章を読んで、ラベルを一つ付けてください。選べるのは{labels}です。",
            "次の文章はどれに当てはまりますか。{labels}から選んで答えてください。",
            "この文章、{labels}のどれに入る？",
        ],
    },
    "summarization": {
        "en": [
            "Summarize the following text.",
            "Write a short summary of the text below.",
            "Give the main points of this text in a few sentences.",
            "Condense the following document into a brief summary.",
            "What is this text about? Summarize it.",
        ],
        "ja": [
            "次の文章を要約してください。",
            "以下の文章を短くまとめてください。",
            "この文章の要点を数文でまとめてください。",
            "次の文書を簡潔に要約してください。",
            "この文章、何が書いてあるか短くまとめてくれる？",
        ],
    },
}

# How the passage and the question share the `input` field of a QA record.
QA_INPUT: dict[str, str] = {
    "en": "{context}\n\nQuestion: {question}",
    "ja": "{context}\n\n質問: {question}",
}

# The answer a model should learn for a question the passage does not answer (SQuAD 2.0's
# empty answers): an empty output would teach it to say nothing at all.
UNANSWERABLE: dict[str, str] = {
    "en": "The passage does not answer this question.",
    "ja": "この文章には、この質問の答えは書かれていません。",
}

# Joins the label list inside a classification instruction.
LABEL_SEPARATOR: dict[str, str] = {"en": ", ", "ja": "、"}

# What separates labels in `--labels`: a comma, or the comma and 読点 a Japanese keyboard types
# (，、 and the half-width ､), so `--labels 肯定、否定` means two labels, not one.
_LABEL_SPLIT = re.compile(r"[,，、､]")


def split_labels(text: str | None) -> list[str]:
    """`split_labels("肯定、否定, 中立") == ["肯定", "否定", "中立"]`; empty pieces are dropped."""
    return [label.strip() for label in _LABEL_SPLIT.split(text or "") if label.strip()]

# Language names for the translation instructions, by ISO 639-1 code, in each instruction
# language. A code not listed here is written as the code itself.
LANGUAGE_NAMES: dict[str, dict[str, str]] = {
    "en": {"en": "English", "ja": "Japanese", "zh": "Chinese", "ko": "Korean", "fr": "French",
           "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ru": "Russian"},
    "ja": {"en": "英語", "ja": "日本語", "zh": "中国語", "ko": "韓国語", "fr": "フランス語",
           "de": "ドイツ語", "es": "スペイン語", "it": "イタリア語", "pt": "ポルトガル語", "ru": "ロシア語"},
}


def language_name(code: str, in_language: str) -> str:
    """`language_name("ja", "en") == "Japanese"`; unknown codes come back unchanged."""
    return LANGUAGE_NAMES.get(in_language, LANGUAGE_NAMES["en"]).get(code.lower(), code)
