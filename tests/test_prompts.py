"""Prompt building and continuation parsing for `generate`, on literal strings."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import UserError
from pipeline.prompts import (
    NO_OUTPUT, PROMPT_DIR, REPEATED_EXAMPLE, TRUNCATED, build_alpaca_prompt, build_self_instruct_prompt,
    load_prompt_file, parse_alpaca_tasks, parse_numbered_list, render, prompt_file_path,
)


def instructions(parsed):
    return [item.instruction for item in parsed.items]


@pytest.mark.parametrize("mode", ["self-instruct", "alpaca"])
@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("language", ["en", "ja"])
def test_every_builtin_prompt_file_exists_and_has_the_examples_slot(mode, api, language):
    assert prompt_file_path(mode, api, language).exists()
    assert "{examples}" in load_prompt_file(mode, api, language)


@pytest.mark.parametrize("language, alpaca_label", [("en", "Instruction:"), ("ja", "指示:")])
def test_every_completion_prompt_ends_exactly_where_the_model_continues(language, alpaca_label):
    examples = ["Name a color.", "色の名前を一つ挙げてください。"] * 4  # 8 examples: the model writes item 9
    for path in PROMPT_DIR.glob(f"generate_*_completions_{language}.txt"):
        assert path.read_text(encoding="utf-8").endswith("\n")  # the file keeps its final newline
    si = build_self_instruct_prompt(load_prompt_file("self-instruct", "completions", language), examples, num_new=8)
    assert si.endswith("\n8. 色の名前を一つ挙げてください。\n9.")  # no newline or space after "9."
    tasks = [(text, "", "ok") for text in examples]
    alpaca = build_alpaca_prompt(load_prompt_file("alpaca", "completions", language), tasks, 12, language=language)
    assert alpaca.endswith(f"###\n9. {alpaca_label}")
    # Every completions template in the folder is covered above: the two modes, this language.
    assert len(list(PROMPT_DIR.glob(f"generate_*_completions_{language}.txt"))) == 2


def test_a_completion_prompt_file_loses_its_final_newline_and_a_chat_one_keeps_it(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("例:\n{examples}\n{next_number}.\n\n", encoding="utf-8")
    assert build_self_instruct_prompt(load_prompt_file("self-instruct", "completions", "ja", path), ["足して。"], 4) == (
        "例:\n1. 足して。\n2.")
    assert load_prompt_file("self-instruct", "chat", "ja", path).endswith("{next_number}.\n\n")


def test_a_prompt_file_without_the_examples_slot_is_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("Write some tasks.\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"--prompt-file .*p\.txt: has no \{examples\} slot"):
        load_prompt_file("self-instruct", "chat", "en", path)
    with pytest.raises(UserError, match="no such file"):
        load_prompt_file("self-instruct", "chat", "en", tmp_path / "missing.txt")


def test_a_prompt_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    path = tmp_path / "shift_jis.txt"
    path.write_bytes("例を続けてください。\n{examples}\n".encode("shift_jis"))
    with pytest.raises(UserError, match=r"^--prompt-file .*shift_jis\.txt: cannot read it \(.*utf-8"):
        load_prompt_file("self-instruct", "chat", "ja", path)


def test_render_fills_known_slots_and_leaves_other_braces():
    assert render('{"a": 1} {examples} {num_new}', examples="X", num_new=3) == '{"a": 1} X 3'


def test_self_instruct_prompt_numbers_the_examples_and_asks_for_the_rest():
    prompt = build_self_instruct_prompt("{examples}\n({next_number}-{last_number}, {num_new} new of {num_examples})",
                                        ["Add two\nnumbers.", "Name a color."], num_new=3)
    assert prompt == "1. Add two numbers.\n2. Name a color.\n(3-5, 3 new of 2)"


def test_alpaca_prompt_shows_noinput_and_the_labels_of_the_language():
    en = build_alpaca_prompt("{examples}\n###\n{next_number}.", [("Add.", "", "5"), ("Sort.", "3 1", "1 3")], 20)
    assert en == ("###\n1. Instruction: Add.\n1. Input:\n<noinput>\n1. Output:\n5\n"
                  "###\n2. Instruction: Sort.\n2. Input:\n3 1\n2. Output:\n1 3\n###\n3.")
    ja = build_alpaca_prompt("{examples}", [("足して。", "", "5")], 20, language="ja")
    assert ja == "###\n1. 指示: 足して。\n1. 入力:\n<入力なし>\n1. 出力:\n5"


def test_numbered_list_reads_the_usual_marker_styles():
    text = ("Sure! Here are new tasks:\n\n9. Write a haiku about rain.\n10) Explain photosynthesis simply.\n"
            "Task 11: Convert 5 km to miles.\n**12.** Suggest a name for a cat.\n- 13. Summarize the news.\n"
            "14: List three prime numbers.\n")
    parsed = parse_numbered_list(text)
    assert instructions(parsed) == ["Write a haiku about rain.", "Explain photosynthesis simply.",
                                    "Convert 5 km to miles.", "Suggest a name for a cat.",
                                    "Summarize the news.", "List three prime numbers."]
    assert [item.number for item in parsed.items] == [9, 10, 11, 12, 13, 14]


def test_numbered_list_drops_prose_after_a_blank_line_and_counts_empty_items():
    parsed = parse_numbered_list("9. Name a river.\n10.\n11. Give an antonym of 'hot'.\n\nI hope these help!")
    assert instructions(parsed) == ["Name a river.", "Give an antonym of 'hot'."]
    assert parsed.empty == 1


def test_an_item_may_wrap_onto_the_next_line():
    assert instructions(parse_numbered_list("9. Write a letter to a friend\nabout your holiday.\n10. Hi there.")) == [
        "Write a letter to a friend about your holiday.", "Hi there."]


def test_a_decimal_at_a_line_start_is_not_a_marker():
    parsed = parse_numbered_list("9. Compute the sum of\n1.5 and 2.25.\n")
    assert instructions(parsed) == ["Compute the sum of 1.5 and 2.25."]


def test_repeated_examples_are_dropped_with_their_reason():
    parsed = parse_numbered_list("1. Add two numbers.\n9. add two  NUMBERS\n10. Name a planet.",
                                 examples=["Add two numbers."])
    assert instructions(parsed) == ["Name a planet."]
    assert [(reason, c.instruction) for reason, c in parsed.dropped] == [
        (REPEATED_EXAMPLE, "Add two numbers."), (REPEATED_EXAMPLE, "add two NUMBERS")]


def test_the_last_item_is_dropped_when_the_answer_was_cut_off():
    parsed = parse_numbered_list("9. Name a planet.\n10. Write a story about a dragon who", truncated=True)
    assert instructions(parsed) == ["Name a planet."]
    assert parsed.dropped[0][0] == TRUNCATED


def test_a_completion_continues_inside_the_first_item():
    parsed = parse_numbered_list(" Describe a sunset.\n10. Name a fruit.", starts_inside=9)
    assert [(item.number, item.instruction) for item in parsed.items] == [(9, "Describe a sunset."), (10, "Name a fruit.")]


def test_japanese_lists_with_fullwidth_numbers_and_labels():
    parsed = parse_numbered_list("続きです。\n７．俳句を一つ作ってください。\nタスク8：「こんにちは」を英語に訳してください。\n9、好きな季節を説明してください。")
    assert instructions(parsed) == ["俳句を一つ作ってください。", "「こんにちは」を英語に訳してください。",
                                    "好きな季節を説明してください。"]
    assert [item.number for item in parsed.items] == [7, 8, 9]


def test_a_leading_label_and_quotes_are_removed():
    assert instructions(parse_numbered_list('9. Instruction: "Name a planet."\n10. **Task:** Add 2 and 3.')) == [
        "Name a planet.", "Add 2 and 3."]


# Markdown as chat models write numbered lists: (answer, the instructions parsed from it).
MARKDOWN_LISTS = {
    "balanced emphasis and a bold leading label, English": (
        "9. **Summarize** the text below in two sentences.\n"
        "10. **Creative Writing:** Write a short poem about autumn leaves.\n"
        "11. Write a *very* short story about a _brave_ cat.\n"
        "12. Describe ***bold italic*** and **nested *inner* bold** text.\n"
        "13.**Rewrite** the sentence in the passive voice.\n"
        "14. **Explain this concept:** recursion\n",
        ["Summarize the text below in two sentences.", "Write a short poem about autumn leaves.",
         "Write a very short story about a brave cat.", "Describe bold italic and nested inner bold text.",
         "Rewrite the sentence in the passive voice.",
         "Explain this concept: recursion"]),  # the bold part is the task: longer than what follows
    "balanced emphasis and a bold leading label, Japanese": (
        "9. **要約：** 次の文章を三行で要約してください。\n"
        "10. 次の**文章**を*英語*に翻訳してください。\n"
        "11. **翻訳**：この文を丁寧な日本語に直してください。\n",
        ["次の文章を三行で要約してください。", "次の文章を英語に翻訳してください。", "この文を丁寧な日本語に直してください。"]),
    "stars and underscores that are not emphasis stay": (
        "9. Compute 2*3*4 and explain each step.\n10. Rename my_var_name to camelCase.\n"
        "11. Explain what the __init__ method does in Python.\n12. Add *args and **kwargs to the function.\n"
        "13. 2*3*4を計算してください。",
        ["Compute 2*3*4 and explain each step.", "Rename my_var_name to camelCase.",
         "Explain what the __init__ method does in Python.", "Add *args and **kwargs to the function.",
         "2*3*4を計算してください。"]),
    "a heading line between items is not part of the item before it": (
        "**Creative Writing:**\n9. Write a poem about rain.\n**Math:**\n10. Add 2 and 3.\n"
        "## 日本語\n11. 俳句を一つ作ってください。",
        ["Write a poem about rain.", "Add 2 and 3.", "俳句を一つ作ってください。"]),
}


@pytest.mark.parametrize("answer, expected", MARKDOWN_LISTS.values(), ids=MARKDOWN_LISTS.keys())
def test_markdown_in_numbered_lists(answer, expected):
    assert instructions(parse_numbered_list(answer)) == expected


def test_an_answer_full_of_unmatched_stars_parses_in_linear_time():
    # Each "*" could open emphasis; an unbounded search for its closer made this quadratic
    # (18 KB took 8 s, this 36 KB one about 30 s). Bounded, it takes well under a second.
    hostile = "9. " + "*, " * 12_000 + "\n10. 「*」、" * 2_000
    started = time.perf_counter()
    parse_numbered_list(hostile)
    parse_alpaca_tasks(hostile, starts_inside=1)
    assert time.perf_counter() - started < 5


def test_alpaca_tasks_keep_input_and_output():
    text = ("###\n4. Instruction: Sort the numbers.\n4. Input:\n3, 1, 2\n4. Output:\n1, 2, 3\n"
            "###\n5. Instruction: Tell a joke.\n5. Input:\n<noinput>\n5. Output:\nWhy did the chicken...\n\nIt crossed.\n"
            "###\n6. Instruction: Name a planet.\n6. Input:\n")
    parsed = parse_alpaca_tasks(text)
    assert [(c.instruction, c.input, c.output) for c in parsed.items] == [
        ("Sort the numbers.", "3, 1, 2", "1, 2, 3"), ("Tell a joke.", "", "Why did the chicken...\n\nIt crossed.")]
    assert [(reason, c.instruction) for reason, c in parsed.dropped] == [(NO_OUTPUT, "Name a planet.")]


def test_alpaca_completion_starts_inside_the_instruction_and_truncation_drops_the_last():
    text = (" Add 2 and 3.\n4. Input:\n<noinput>\n4. Output:\n5\n###\n5. Instruction: Name a color.\n5. Input:\n\n5. Output:\nBlue\n"
            "###\n6. Instruction: Write a poem.\n6. Input:\n<noinput>\n6. Output:\nRoses are")
    parsed = parse_alpaca_tasks(text, starts_inside=4, truncated=True, examples=["Name a color"])
    assert [(c.number, c.instruction, c.output) for c in parsed.items] == [(4, "Add 2 and 3.", "5")]
    assert sorted(reason for reason, _ in parsed.dropped) == [REPEATED_EXAMPLE, TRUNCATED]


def test_alpaca_tasks_in_japanese_without_numbers():
    parsed = parse_alpaca_tasks("指示：次の文を要約してください。\n入力：\n今日は晴れです。\n出力：\n晴れ。")
    assert [(c.instruction, c.input, c.output) for c in parsed.items] == [("次の文を要約してください。", "今日は晴れです。", "晴れ。")]


_ANSWER_PARTS = st.lists(st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\n", "\n\n", "9.", "10)", "Task 3:", "**4.**", "###", "1. Instruction:", "Input:",
                     "Output:", "指示：", "出力:", "<noinput>", "１２．", "1.5", "\r\n", "\x00", "**", "「",
                     "*", "_", "__", "***", "**Creative Writing:**", "**要約：**", "**Math:**\n", "## 見出し\n"]),
), max_size=30)


@settings(max_examples=300, deadline=None)
@given(_ANSWER_PARTS, st.booleans(), st.one_of(st.none(), st.integers(0, 30)))
def test_parsers_never_raise_and_return_clean_items(parts, truncated, starts_inside):
    text = "".join(parts)
    for parse in (parse_numbered_list, parse_alpaca_tasks):
        parsed = parse(text, examples=["Add two numbers."], truncated=truncated, starts_inside=starts_inside)
        for item in parsed.items:
            assert item.instruction and item.instruction == item.instruction.strip()
            assert "\n" not in item.instruction


# Instructions as a chat model writes them in a list: words, some in emphasis, maybe a bold label.
_EN_WORDS = st.sampled_from(["Write", "a", "short", "poem", "about", "the", "sea", "Explain", "why", "cats", "purr",
                             "Summarize", "this", "text", "in", "two", "sentences"])
_JA_WORDS = st.sampled_from(["次の", "文章", "を", "英語", "に", "翻訳", "して", "ください", "猫", "について", "説明"])
_EMPHASES = st.sampled_from(["", "", "*", "**", "***", "_", "__"])
_LABELS = st.sampled_from(["", "**Creative Writing:** ", "**Math**: ", "**要約：** ", "**翻訳**："])


@st.composite
def _emphasized_instruction(draw) -> tuple[str, str]:
    """(as the model writes it, the plain instruction the parser must return)."""
    japanese = draw(st.booleans())
    words = draw(st.lists(_JA_WORDS if japanese else _EN_WORDS, min_size=4, max_size=10))
    emphases = draw(st.lists(_EMPHASES, min_size=len(words), max_size=len(words)))
    # "__init__" is a Python name, not bold: the parser keeps a lowercase word in double underscores.
    emphases = ["**" if e == "__" and w.islower() else e for w, e in zip(words, emphases)]
    if japanese:  # with no space between, "*a**b*" is not two emphases in markdown either
        for k in range(1, len(emphases)):
            if emphases[k] and emphases[k - 1][:1] == emphases[k][:1]:
                emphases[k] = ""
    marked = [f"{e}{w}{e}" for w, e in zip(words, emphases)]
    joiner = "" if japanese else " "
    end = "。" if japanese else "."
    return draw(_LABELS) + joiner.join(marked) + end, joiner.join(words) + end


@settings(max_examples=300, deadline=None)
@given(st.lists(_emphasized_instruction(), min_size=1, max_size=6), st.integers(1, 20))
def test_emphasis_and_bold_labels_never_reach_an_instruction(items, first):
    text = "Here are the tasks:\n" + "\n".join(f"{first + k}. {written}" for k, (written, _) in enumerate(items))
    assert instructions(parse_numbered_list(text)) == [plain for _, plain in items]
