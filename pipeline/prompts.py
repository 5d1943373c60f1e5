"""Prompts for `generate`, and the parsers that read the model's continuation back. Pure functions.

Two formats, as in the two methods `generate` follows:

- self-instruct: a numbered list of example instructions; the model continues the list.
  `build_self_instruct_prompt` / `parse_numbered_list`.
- alpaca: numbered tasks, each with an instruction, an input and an output, separated by
  `###`; the model writes more of them. `build_alpaca_prompt` / `parse_alpaca_tasks`.

The prompt texts live in `pipeline/prompt_files/*.txt` (one per mode, API and language) so
they can be read and changed without touching code; `--prompt-file` replaces them. A prompt
file names its slots in braces: `{examples}` (required), `{num_examples}`, `{next_number}`,
`{last_number}`, `{num_new}`. Other braces are left alone, so a prompt file may contain JSON.
A completions-API prompt file loses its trailing whitespace (the file's final newline): the prompt
must end exactly where the model continues, `"...\n9."`, as Self-Instruct's does; after
`"9.\n"` a base model writes `10.\n11.\n...` and the answer parses to nothing.

The parsers never raise on any text: a model may answer with anything, and a bad answer costs
one request, not the run.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pipeline.errors import UserError
from pipeline.heuristics import fold_width_case_space
from pipeline.lang import text_length

PROMPT_DIR = Path(__file__).parent / "prompt_files"
SLOTS = ("examples", "num_examples", "next_number", "last_number", "num_new")
REQUIRED_SLOT = "{examples}"
COMPLETIONS_API = "completions"  # the API whose prompt the model continues token by token

# The labels of the alpaca format, per language; the parser reads either language's labels,
# since a model asked in Japanese sometimes answers with the English ones and the other way round.
LABELS = {
    "en": ("Instruction", "Input", "Output"),
    "ja": ("指示", "入力", "出力"),
}
# What an example with an empty input shows in place of it; read back as "".
NO_INPUT = {"en": "<noinput>", "ja": "<入力なし>"}
NO_INPUT_WORDS = {"<noinput>", "<no input>", "<入力なし>", "noinput", "入力なし", "なし", "none", "n/a", "(none)"}

# Reasons a parsed item is dropped before any filter sees it; `generate` logs them as rejects.
REPEATED_EXAMPLE = "repeated_example"  # the model copied one of the prompt's own examples back
TRUNCATED = "truncated"  # the last item of an answer cut off by max_tokens (finish_reason "length")
NO_OUTPUT = "no_output"  # an alpaca task without its output
# What a copied example may end with that a copy need not keep.
END_PUNCTUATION = " .。!！?？"

# An item marker at the start of a line: "9.", "9)", "9:", "Task 9:", "**9.**", "- 9.", "９．",
# "タスク9：". Digits count only when no other digit follows the punctuation ("1.5 km" is prose),
# and at most three of them: a year or a quantity at a line start is not an item number. A "**"
# after the number closes a bold number only before a space ("9.**Summarize** it" opens bold).
_MARKER = re.compile(
    r"^[ \t]*(?:[-*>#]+[ \t]*)?(?:\*\*)?"
    r"(?:(?:task|instruction|item|タスク|指示|依頼)[ \t]*(?:no\.?|#)?[ \t]*)?"
    r"(\d{1,3})[ \t]*(?:[.)．）:：、]|(?=\*\*))(?!\d)(?:\*\*(?=[ \t]|$))?[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
# A label some models put in front of an item's text ("9. Instruction: ...").
_LEADING_LABEL = re.compile(r"^(?:\*\*)?(?:task|instruction|new task|タスク|指示|依頼)(?:\*\*)?[ \t]*[:：](?:\*\*)?[ \t]*",
                            re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
# Balanced markdown emphasis inside an item: "**Summarize** the text", "a *very* short story",
# "次の**文章**を". A delimiter next to an ASCII letter or digit is not emphasis ("2*3*4",
# "my_var_name"); kana and kanji may touch it, since Japanese has no spaces to put between.
# Stars and underscores are matched apart, so "*a*_b_" (no space between, as in Japanese) is two.
# Emphasis spans a word or a phrase: bounding its length keeps an answer full of unmatched stars
# linear (unbounded, 6,000 of them took 8 s to parse; bounded, milliseconds).
_MAX_EMPHASIS_CHARS = 200
_EMPHASIS = tuple(re.compile(rf"(?<![A-Za-z0-9{d}\\])({d}{{1,{n}}})(?=[^\s{d}])(.{{1,{_MAX_EMPHASIS_CHARS}}}?)"
                             rf"(?<=[^\s\\])\1(?![A-Za-z0-9{d}])")
                  for d, n in ((r"\*", 3), ("_", 2)))
# Emphasis nested in emphasis ("**a *b* c**") is undone from the outside in, one level a pass.
_EMPHASIS_PASSES = 3
# A bold (or italic) label in front of an item: "**Creative Writing:** Write...", "**要約**：次の...".
_EMPHASIZED_LABEL = re.compile(r"^(\*{1,3}|__)(?=[^\s*_])([^*_\n]+?)(?:[:：][ \t]*\1|\1[ \t]*[:：])[ \t]*(?=\S)")
# A line of its own that is a markdown heading ("## Math", "**Math:**") ends the item before it:
# it titles the items that follow. Only lines after an item's first one: its first line is the item.
_HEADING_LINE = re.compile(r"\n[ \t]*(?:#{1,6}[ \t][^\n]*|(\*\*|__)[^\n]+?\1[ \t]*[:：]?[ \t]*)(?=\n|$)")
# Markdown emphasis around an item; quotes are removed only as a pair around the whole item,
# since 「...」 at the start of a Japanese task is usually part of it.
_WRAPPERS = "*`_ \t"
_QUOTE_PAIRS = ('""', "''", "“”", "「」", "『』")
_ALL_LABELS = "|".join(re.escape(label) for labels in LABELS.values() for label in labels)
_KIND = {label.lower(): i for labels in LABELS.values() for i, label in enumerate(labels)}
# A field label of the alpaca format at a line start: "9. Instruction:", "Input:", "**出力：**".
_FIELD = re.compile(
    r"^[ \t]*(?:#+[ \t]*)?(?:\*\*)?(?:(\d{1,3})[ \t]*[.)．）][ \t]*)?(?:\*\*)?"
    rf"({_ALL_LABELS})(?:\*\*)?[ \t]*[:：](?:\*\*)?[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
# The separator line between alpaca tasks.
_SEPARATOR = re.compile(r"^[ \t]*#{3,}[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class Candidate:
    """One task the model wrote: an instruction and, in alpaca mode, its input and output."""

    instruction: str
    input: str = ""
    output: str | None = None  # None: the format has no output (self-instruct)
    number: int | None = None  # the number the model gave it, when it gave one


@dataclass
class Parsed:
    items: list[Candidate] = field(default_factory=list)
    dropped: list[tuple[str, Candidate]] = field(default_factory=list)  # (reason, candidate)
    empty: int = 0  # items with no text: nothing to show a person, so only counted


# ---------------------------------------------------------------- prompt files


def prompt_file_path(mode: str, api: str, language: str) -> Path:
    """The built-in prompt file: e.g. `generate_self_instruct_chat_ja.txt`."""
    return PROMPT_DIR / f"generate_{mode.replace('-', '_')}_{api}_{language}.txt"


def read_prompt_text(source: Path, flag: str) -> str:
    """A prompt file's text (UTF-8), or one line naming `flag` and the file when it cannot be read."""
    try:
        return source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{flag} {source}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {source}: cannot read it ({e})") from None


def load_prompt_file(mode: str, api: str, language: str, path: str | Path | None = None) -> str:
    """The prompt file's text: `path` when given (from `--prompt-file`), else the built-in one.

    For the completions API the text ends where the model continues: trailing whitespace is cut.
    """
    source = Path(path) if path else prompt_file_path(mode, api, language)
    flag = "--prompt-file" if path else "prompt file"
    text = read_prompt_text(source, flag)
    if REQUIRED_SLOT not in text:
        raise UserError(f"{flag} {source}: has no {REQUIRED_SLOT} slot, so the examples would not be shown")
    return text.rstrip() if api == COMPLETIONS_API else text


def render(prompt_text: str, **values) -> str:
    """Fill the `{slot}`s named in SLOTS; any other brace is left as written."""
    for name, value in values.items():
        if name not in SLOTS:
            raise ValueError(f"unknown prompt slot {name!r}")
        prompt_text = prompt_text.replace("{" + name + "}", str(value))
    return prompt_text


def one_line(text: str) -> str:
    """An instruction as one line: a numbered list item cannot hold a line break."""
    return " ".join(text.split())


def build_self_instruct_prompt(prompt_text: str, examples: list[str], num_new: int) -> str:
    """The prompt listing `examples` as 1..k and asking for items k+1 .. k+num_new."""
    listing = "\n".join(f"{i}. {one_line(text)}" for i, text in enumerate(examples, start=1))
    k = len(examples)
    return render(prompt_text, examples=listing, num_examples=k, next_number=k + 1,
                  last_number=k + num_new, num_new=num_new)


def format_alpaca_task(number: int, instruction: str, input: str, output: str, language: str = "en") -> str:
    label_instruction, label_input, label_output = LABELS.get(language, LABELS["en"])
    shown_input = input.strip() or NO_INPUT.get(language, NO_INPUT["en"])
    return (f"###\n{number}. {label_instruction}: {one_line(instruction)}\n"
            f"{number}. {label_input}:\n{shown_input}\n"
            f"{number}. {label_output}:\n{output.strip()}")


def build_alpaca_prompt(prompt_text: str, examples: list[tuple[str, str, str]], num_new: int,
                        language: str = "en") -> str:
    """The prompt showing `examples` as (instruction, input, output) tasks 1..k, asking for num_new more."""
    listing = "\n".join(format_alpaca_task(i, *task, language=language) for i, task in enumerate(examples, start=1))
    k = len(examples)
    return render(prompt_text, examples=listing, num_examples=k, next_number=k + 1,
                  last_number=k + num_new, num_new=num_new)


# ---------------------------------------------------------------- parsing


def fold_width_case_space_end_punct(text: str) -> str:
    """For telling a copied example from a new task: `heuristics.fold_width_case_space`, and the
    end punctuation ignored too (a model that copies an example often drops or changes its full stop)."""
    return fold_width_case_space(text).rstrip(END_PUNCTUATION)


def _unemphasize(match: re.Match) -> str:
    delimiter, inner = match.group(1), match.group(2)
    if delimiter == "__" and inner.isascii() and inner.isidentifier() and inner.islower():
        return match.group(0)  # a Python name such as __init__, not bold text
    return inner


def remove_emphasis(line: str) -> str:
    """`line` without balanced markdown emphasis (`**x**`, `*x*`, `***x***`, `__x__`, `_x_`)."""
    for _ in range(_EMPHASIS_PASSES):
        plain = line
        for pattern in _EMPHASIS:
            plain = pattern.sub(_unemphasize, plain)
        if plain == line:
            break
        line = plain
    return line


def drop_emphasized_label(line: str) -> str:
    """`line` without a bold leading label ("**Creative Writing:** Write a poem." -> "Write a poem.").

    The label goes only when what follows is longer than it: in "**Explain this concept:**
    recursion" the bold part is the task itself.
    """
    match = _EMPHASIZED_LABEL.match(line)
    if match and text_length(line[match.end():]) > text_length(match.group(2)):
        return line[match.end():]
    return line


def _clean_item(text: str) -> str:
    """The first paragraph of an item, on one line, without markdown, quotes or a leading label."""
    paragraph = _BLANK_LINE.split(text.strip(), maxsplit=1)[0]
    paragraph = _SEPARATOR.sub("", paragraph)
    heading = _HEADING_LINE.search(paragraph)
    if heading:
        paragraph = paragraph[:heading.start()]
    line = remove_emphasis(drop_emphasized_label(one_line(paragraph)))
    for _ in range(2):  # a label inside emphasis, or emphasis inside a label
        line = _LEADING_LABEL.sub("", line.strip(_WRAPPERS)).strip(_WRAPPERS)
    if len(line) >= 2 and line[0] + line[-1] in _QUOTE_PAIRS and line[0] not in line[1:-1] and line[-1] not in line[1:-1]:
        line = line[1:-1]
    return one_line(line)


def _finish(items: list[Candidate], examples: Iterable[str], truncated: bool, empty: int) -> Parsed:
    parsed = Parsed(empty=empty)
    if truncated and items:
        parsed.dropped.append((TRUNCATED, items.pop()))
    seen_examples = {fold_width_case_space_end_punct(text) for text in examples}
    for item in items:
        if fold_width_case_space_end_punct(item.instruction) in seen_examples:
            parsed.dropped.append((REPEATED_EXAMPLE, item))
        elif item.output is not None and not item.output.strip():
            parsed.dropped.append((NO_OUTPUT, item))
        else:
            parsed.items.append(item)
    return parsed


def parse_numbered_list(text: str, *, examples: Iterable[str] = (), truncated: bool = False,
                        starts_inside: int | None = None) -> Parsed:
    """The items of a numbered list the model wrote.

    - Items start at a line-start marker (`9.`, `9)`, `Task 9:`, `**9.**`); an item runs to the
      next marker or to a blank line, after which any text is prose and ignored.
    - Text before the first marker is prose, unless `starts_inside` is a number: a completion
      prompt that ended with "9." gets item 9 without its marker.
    - An item equal to one of `examples` is dropped as `repeated_example`; when `truncated`
      (finish_reason "length") the last item is dropped as `truncated`; empty items are counted.
    """
    text = str(text or "").replace("\r\n", "\n").replace("\r", "\n")
    markers = list(_MARKER.finditer(text))
    pieces: list[tuple[int | None, str]] = []
    head_end = markers[0].start() if markers else len(text)
    if starts_inside is not None:
        pieces.append((starts_inside, text[:head_end]))
    for i, match in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        pieces.append((_number(match.group(1)), text[match.end():end]))
    items, empty = [], 0
    for number, body in pieces:
        instruction = _clean_item(body)
        if instruction:
            items.append(Candidate(instruction, number=number))
        else:
            empty += 1
    return _finish(items, examples, truncated, empty)


def _number(digits: str | None) -> int | None:
    try:
        return int(unicodedata.normalize("NFKC", digits)) if digits else None
    except ValueError:
        return None


def parse_alpaca_tasks(text: str, *, examples: Iterable[str] = (), truncated: bool = False,
                       starts_inside: int | None = None) -> Parsed:
    """The tasks of an alpaca-format answer: `N. Instruction: ...`, `N. Input:`, `N. Output:`, `###`.

    Labels in English or Japanese (指示 / 入力 / 出力) are read; an `Instruction` label starts a
    new task. `<noinput>` (or an absent input) becomes "". When `starts_inside` is a number, the
    text before the first label is that task's instruction (the prompt ended with
    "N. Instruction:"). Tasks without an output are dropped as `no_output`; copied examples,
    a truncated last task and empty tasks as in `parse_numbered_list`.
    """
    text = str(text or "").replace("\r\n", "\n").replace("\r", "\n")
    labels = list(_FIELD.finditer(text))
    tasks: list[dict] = []
    if starts_inside is not None:
        head_end = labels[0].start() if labels else len(text)
        tasks.append({"number": starts_inside, 0: text[:head_end]})
    for i, match in enumerate(labels):
        kind = _KIND[match.group(2).lower()]
        end = labels[i + 1].start() if i + 1 < len(labels) else len(text)
        value = text[match.end():end]
        number = _number(match.group(1))
        if kind == 0 or not tasks or kind in tasks[-1]:
            tasks.append({"number": number})
        tasks[-1][kind] = value
    items, empty = [], 0
    for task in tasks:
        instruction = _clean_item(task.get(0, ""))
        if not instruction:
            empty += 1
            continue
        items.append(Candidate(instruction, _field_text(task.get(1, ""), is_input=True),
                               _field_text(task.get(2, ""), is_input=False), task["number"]))
    return _finish(items, examples, truncated, empty)


def _field_text(value: str, *, is_input: bool) -> str:
    """An input or output up to the `###` separator, line breaks kept (outputs may have paragraphs)."""
    value = _SEPARATOR.split(value, maxsplit=1)[0].strip()
    if is_input and value.strip(_WRAPPERS + "\"'").casefold() in NO_INPUT_WORDS:
        return ""
    return value
