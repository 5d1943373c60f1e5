"""pipeline/respond_prompts.py: prompt building, few-shot choice and answer parsing, on literal strings."""

import json
import random
from pathlib import Path

import pytest

from pipeline import respond_prompts as p
from pipeline.seeds import Instance, SeedTask


def seed(i, instruction, output, given="", cls=False, lang="en"):
    return SeedTask(f"s{i}", instruction, (Instance(given, output),), cls, "", lang)


SEEDS = [
    seed(0, "Classify the sentiment of the review.", "positive", "I loved it.", cls=True),
    seed(1, "Is the number even?", "no", "7", cls=True),
    seed(2, "Write a haiku about rain.", "Rain taps the window"),
    seed(3, "Translate to French.", "bonjour", "hello"),
    seed(4, "Summarize the text.", "A cat sat.", "The cat sat on the mat all day."),
    seed(5, "次の文の感情を分類してください。", "肯定的", "とても楽しかった。", cls=True, lang="ja"),
    seed(6, "日本の首都はどこですか？", "東京です。", lang="ja"),
    seed(7, "次の文を英語に翻訳してください。", "I am a cat.", "吾輩は猫である。", lang="ja"),
    seed(8, "好きな季節について短い文を書いてください。", "春が好きです。", lang="ja"),
]


# ------------------------------------------------------------ parsing


@pytest.mark.parametrize("answer, expected", [
    ("Input: 7\nOutput: odd", ("7", "odd")),
    ("Input: None\nOutput: Rain taps the window", ("", "Rain taps the window")),
    ("input: n/a.\noutput: done", ("", "done")),
    ("**Input:** hello\n**Output:** bonjour", ("hello", "bonjour")),
    ("Sure! Here is an example.\n\nInput: The cat sat.\nOutput: A cat.", ("The cat sat.", "A cat.")),
    ("Input: a\nOutput: b\n\nTask: Another task\nInput: c\nOutput: d", ("a", "b")),
    ("Input: a\nOutput: b\nInput: c\nOutput: d", ("a", "b")),
    ("Input: two\nlines here\nOutput: first\nsecond", ("two\nlines here", "first\nsecond")),
    ("入力：なし\n出力：東京です。", ("", "東京です。")),
    ("入力: 吾輩は猫である。\n出力: I am a cat.", ("吾輩は猫である。", "I am a cat.")),
    ("Paris is the capital of France.", ("", "Paris is the capital of France.")),
    ("Input: only an input", ("only an input", "")),
    ("Answer: 42", ("", "42")),  # a synonym is accepted as the first label
    ("Input: x\nAnswer: 42", ("x\nAnswer: 42", "")),  # but only the prompt's own labels end a field
    ("入力：なし\n出力：問題：1 + 1は？\n回答：2", ("", "問題：1 + 1は？\n回答：2")),
    ("入力：問題：3 × 4\n答え：12\n出力：正解です。", ("問題：3 × 4\n答え：12", "正解です。")),
    ("入力：なし\n出力：手順\n指示：右に曲がる\nタスク：別の例", ("", "手順\n指示：右に曲がる")),
    ("", ("", "")),
])
def test_parse_input_first(answer, expected):
    parsed = p.parse_input_first(answer)
    assert (parsed.input, parsed.output) == expected


SEEDS_FILE = Path(__file__).resolve().parents[1] / "seeds" / "seed_tasks.jsonl"


def seed_148() -> dict:
    for line in SEEDS_FILE.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["id"] == "seed_task_148":
            return record
    raise AssertionError("seed_task_148 is missing from seeds/seed_tasks.jsonl")


@pytest.mark.parametrize("label_style", ["{name}：", "{name}: ", "**{name}**："])
def test_seed_148s_answer_line_survives_parsing(label_style):
    # The seed's own output ends with 「答え：130円」: a line inside the output, not a new field.
    record = seed_148()
    given, output = record["instances"][0]["input"], record["instances"][0]["output"]
    assert "\n答え：130円" in output
    label = lambda name: label_style.format(name=name)  # noqa: E731
    answer = f"{label('入力')}{given}\n{label('出力')}{output}"
    parsed = p.parse_input_first(answer)
    assert (parsed.input, parsed.output) == (given, output)
    assert p.parse_output_only(output) == output
    assert p.parse_output_only(f"{label('出力')}{output}\n\n{label('タスク')}次の例") == output


def test_question_and_answer_output_keeps_its_answer():
    output = "問題：りんごが3個あり、2個食べました。残りはいくつですか。\n回答：1個"
    parsed = p.parse_input_first(f"入力：なし\n出力：{output}")
    assert (parsed.input, parsed.output) == ("", output)
    assert p.parse_output_only(output) == output
    english = "Question: What is 2 + 2?\nAnswer: 4"
    assert p.parse_input_first(f"Input: None\nOutput: {english}").output == english


@pytest.mark.parametrize("answer, expected", [
    ("Label: positive\nInput: I loved this film.", ("I loved this film.", "positive")),
    ("Class label: Yes\nInput: 12", ("12", "Yes")),
    ("Output: negative\nInput: Awful.", ("Awful.", "negative")),
    ("ラベル：否定的\n入力：つまらなかった。", ("つまらなかった。", "否定的")),
    ("**Label**: spam\n**Input**: WIN A PRIZE", ("WIN A PRIZE", "spam")),
    ("Input: Awful.", ("Awful.", "")),
    ("no labels at all", ("", "")),
])
def test_parse_output_first(answer, expected):
    parsed = p.parse_output_first(answer)
    assert (parsed.input, parsed.output) == expected


@pytest.mark.parametrize("answer, expected", [
    ("Yes", True), ("No", False), ("yes.", True), ("**No**", False), ("  Yes, it is.", True),
    ("I think the answer is no.", False), ("Yes\n\nTask: x\nIs this a classification task?\nNo", True),
    ("はい", True), ("いいえ、違います。", False), ("これは分類タスクではありません。", False),
    ("分類タスクです。", True), ("Maybe", None), ("Nope, nothing", None), ("", None),
])
def test_parse_yes_no(answer, expected):
    assert p.parse_yes_no(answer) is expected


@pytest.mark.parametrize("answer, expected", [
    ("Lima is the capital.", "Lima is the capital."),
    ("Output: Lima", "Lima"),
    ("  Lima.\n\nTask: Name another\nInput: x", "Lima."),
    ("Input: Peru", ""),
])
def test_parse_output_only(answer, expected):
    assert p.parse_output_only(answer) == expected


def test_output_prompt_is_the_training_user_turn():
    prompt = p.output_prompt("Name the capital.", "Peru", "en")
    assert prompt.messages == ({"role": "user", "content": "Name the capital.\n\nPeru"},)
    assert prompt.text == "Task: Name the capital.\nInput: Peru\nOutput:"
    assert p.output_prompt("首都は？", "ペルー", "ja").text == "タスク: 首都は？\n入力: ペルー\n出力:"


@pytest.mark.parametrize("value", ["None", "(none)", "N/A", "<noinput>", "なし", "「なし」", "None.", ""])
def test_no_input_words(value):
    assert p.is_no_input(value)


def test_real_input_is_not_no_input():
    assert not p.is_no_input("None of the above is true.")


# ------------------------------------------------------------ building prompts


def test_decision_prompt_chat_turns_and_plain_text():
    prompt = p.decision_prompt("Is this email spam?", [SEEDS[0], SEEDS[2]], "en")
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in prompt.messages if m["role"] == "assistant"] == ["Yes", "No"]
    assert prompt.messages[-1]["content"] == "Task: Is this email spam?\nIs this a classification task?"
    assert prompt.text.endswith("Task: Is this email spam?\nIs this a classification task?\n")
    assert "Task: Classify the sentiment of the review.\nIs this a classification task?\nYes" in prompt.text


def test_input_first_prompt_shows_none_for_tasks_without_input():
    prompt = p.instance_prompt("input_first", "Name a fruit.", [SEEDS[2], SEEDS[3]], "en")
    answers = [m["content"] for m in prompt.messages if m["role"] == "assistant"]
    assert answers == ["Input: None\nOutput: Rain taps the window", "Input: hello\nOutput: bonjour"]
    assert prompt.text.endswith("Task: Name a fruit.\nInput:")
    assert prompt.answer(" apple\nOutput: yes", "completions") == "Input: apple\nOutput: yes"
    assert prompt.answer("Input: x\nOutput: y", "chat") == "Input: x\nOutput: y"


def test_output_first_prompt_writes_the_label_first():
    prompt = p.instance_prompt("output_first", "Is the word a noun?", [SEEDS[0]], "en")
    assert prompt.messages[2]["content"] == "Label: positive\nInput: I loved it."
    assert "class label" in prompt.messages[0]["content"]
    assert prompt.text.endswith("Task: Is the word a noun?\nLabel:")
    parsed = p.parse_output_first(prompt.answer(" yes\nInput: dog", "completions"))
    assert (parsed.output, parsed.input) == ("yes", "dog")


def test_japanese_prompts_use_japanese_labels():
    prompt = p.instance_prompt("input_first", "猫について書いてください。", [SEEDS[6]], "ja")
    assert prompt.messages[1]["content"] == "タスク: 日本の首都はどこですか？"
    assert prompt.messages[2]["content"] == "入力: なし\n出力: 東京です。"
    assert prompt.text.endswith("タスク: 猫について書いてください。\n入力:")
    decision = p.decision_prompt("猫は動物ですか？", [SEEDS[5]], "ja")
    assert decision.messages[2]["content"] == "はい"
    assert "分類タスクですか" in decision.messages[-1]["content"]


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown prompt kind 'sideways'"):
        p.instance_prompt("sideways", "x", SEEDS, "en")


# ------------------------------------------------------------ choosing examples


def test_instance_examples_same_language_and_kind():
    rng = random.Random(0)
    ja = p.pick_instance_examples(SEEDS, "ja", False, rng, count=3)
    assert {s.id for s in ja} == {"s6", "s7", "s8"}
    en_cls = p.pick_instance_examples(SEEDS, "en", True, rng, count=2)
    assert {s.id for s in en_cls} == {"s0", "s1"}


def test_instance_examples_fill_gaps_from_other_seeds():
    rng = random.Random(0)
    ja_cls = p.pick_instance_examples(SEEDS, "ja", True, rng, count=3)
    assert ja_cls[0].id == "s5"  # the one Japanese classification seed comes first
    assert len(ja_cls) == 3 and all(s.is_classification for s in ja_cls)
    everything = p.pick_instance_examples(SEEDS, "en", True, rng, count=5)
    assert len(everything) == 5 and sum(s.is_classification for s in everything) == 3


def test_decision_examples_are_balanced():
    chosen = p.pick_decision_examples(SEEDS, "en", random.Random(1), count=4)
    assert sum(s.is_classification for s in chosen) == 2
    assert all(s.language == "en" for s in chosen)
    ja = p.pick_decision_examples(SEEDS, "ja", random.Random(1), count=4)
    assert [s.language for s in ja].count("ja") == 3  # one ja classification seed, two others; en fills in
