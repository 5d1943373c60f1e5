"""Prompts and answer parsing for `respond`: the classification question, input-first and output-first.

Everything a person may want to reword is a constant here, one set per language (`en`, `ja`):
the question asked to decide whether a task is a classification task, and the instructions and
field labels of the two instance prompts. Parsing is pure and tolerant, because small models
drift from the format: labels in any case, with markdown bold or a full-width colon, English
or Japanese (`Input:` / `入力：`), text before the first label ignored, and a second example
that the model starts on its own cut off. Only the labels the prompts write end a field, so a
「答え：130円」 or 「回答：…」 line inside an output stays in it.

Prompt shape. For `--api chat` the few-shot examples are turns of a conversation (user: the
task, assistant: the instance), which small chat models imitate far more reliably than
examples pasted into one message. For `--api completions` the same examples are one plain
text that ends with the first label, so a base model continues it.

- Input-first (other tasks): the assistant writes `Input: ...` (or `Input: None`) then
  `Output: ...` in one answer. One request rather than two: the output is written in the same
  context as the input it answers, the prompt is paid for once, and it is the format the
  Self-Instruct paper used. When the answer stops after its input, `output_prompt` asks for
  the output alone (a second request only for those).
- Output-first (classification): `Label: ...` then `Input: ...`, so the model picks a class
  before writing an input, and the inputs are not skewed towards the class that is easiest to
  write an input for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.seeds import Instance, SeedTask

LANGUAGES = ("en", "ja")

# The question that decides classification or not (Self-Instruct, sec. 2.2): a yes/no the
# smallest models can answer in one token.
DECISION_SYSTEM = {
    "en": "Decide if each task is a classification task: its answer is one of a small fixed set of labels. "
          "Answer only Yes or No.",
    "ja": "各タスクが分類タスク（答えが少数の決まったラベルのどれか）かどうかを判断し、「はい」か「いいえ」だけで答えてください。",
}
DECISION_QUESTION = {
    "en": "Task: {instruction}\nIs this a classification task?",
    "ja": "タスク: {instruction}\nこれは分類タスクですか？",
}
DECISION_ANSWER = {"en": ("Yes", "No"), "ja": ("はい", "いいえ")}

INPUT_FIRST_SYSTEM = {
    "en": "For each task, write an example input for it, then the correct output for that input. "
          "If the task needs no input, write \"Input: None\".",
    "ja": "各タスクについて、入力の例を書き、その入力に対する正しい出力を書いてください。"
          "入力が不要なタスクでは「入力: なし」と書いてください。",
}
OUTPUT_FIRST_SYSTEM = {
    "en": "Each task is a classification task. First write one of its class labels, "
          "then write an example input whose correct label is that one.",
    "ja": "各タスクは分類タスクです。まずクラスラベルを一つ書き、次にそのラベルが正解になる入力の例を書いてください。",
}
TASK_LINE = {"en": "Task: {instruction}", "ja": "タスク: {instruction}"}
# The labels the prompts write; the parser accepts these and the synonyms in FIELD_NAMES.
LABEL = {
    "en": {"input": "Input", "output": "Output", "label": "Label"},
    "ja": {"input": "入力", "output": "出力", "label": "ラベル"},
}
NO_INPUT = {"en": "None", "ja": "なし"}

# Field names the parser recognises at the start of a line. Only the labels the prompts
# themselves write (LABEL and TASK_LINE, in either language) may end a field: an answer's
# own text often has lines such as 「答え：130円」, 「回答：…」 or "Answer: 42" inside its
# output, and cutting there would drop the answer. The synonyms below are accepted only where
# the answer opens with one (a model that writes "Answer:" where it was shown "Output:"),
# never inside a field. "task" marks the start of another example the model went on to invent:
# everything from it is dropped.
PROMPT_FIELD_NAMES = {
    "input": (LABEL["en"]["input"], LABEL["ja"]["input"]),
    "output": (LABEL["en"]["output"], LABEL["ja"]["output"]),
    "label": (LABEL["en"]["label"], LABEL["ja"]["label"]),
    "task": tuple(TASK_LINE[lang].split(":")[0] for lang in LANGUAGES),
}
FIRST_FIELD_SYNONYMS = {
    "output": ("answer", "response", "回答", "答え"),
    "label": ("class label", "class", "category", "クラス", "カテゴリ"),
}
FIELD_NAMES = {kind: PROMPT_FIELD_NAMES[kind] + FIRST_FIELD_SYNONYMS.get(kind, ()) for kind in PROMPT_FIELD_NAMES}
# What models write for "this task takes no input"; compared after stripping brackets and a final period.
NO_INPUT_WORDS = frozenset({
    "", "none", "no input", "n/a", "na", "null", "nil", "empty", "<noinput>", "noinput", "-", "nothing",
    "なし", "無し", "ない", "入力なし", "なし（入力不要）", "不要",
})
# Stop strings: a model that finished its instance and starts a new example ends there.
STOP = ("\nTask:", "\nタスク:", "\nタスク：")


@dataclass(frozen=True)
class Prompt:
    """One request's text in both forms, and the text its answer continues (completions only)."""

    messages: tuple[dict, ...]  # for --api chat
    text: str  # for --api completions
    answer_prefix: str  # what `text` ends with that belongs to the answer ("" for chat)

    def answer(self, completion: str, api: str) -> str:
        """The model's answer as if written in full, whichever API produced it."""
        return completion if api == "chat" else self.answer_prefix + completion


# ---------------------------------------------------------------- building prompts


def _language(language: str) -> str:
    return language if language in LANGUAGES else "en"


def _instance_text(kind: str, instance: Instance, lang: str) -> str:
    label = LABEL[lang]
    given = instance.input.strip() or NO_INPUT[lang]
    if kind == "output_first":
        return f"{label['label']}: {instance.output.strip()}\n{label['input']}: {given}"
    return f"{label['input']}: {given}\n{label['output']}: {instance.output.strip()}"


def _build(system: str, shots: list[tuple[str, str]], final_user: str, answer_prefix: str) -> Prompt:
    messages = [{"role": "system", "content": system}]
    blocks = [system]
    for user, assistant in shots:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        blocks.append(f"{user}\n{assistant}")
    messages.append({"role": "user", "content": final_user})
    blocks.append(f"{final_user}\n{answer_prefix}".rstrip(" ") if answer_prefix else final_user + "\n")
    return Prompt(tuple(messages), "\n\n".join(blocks), answer_prefix)


def decision_prompt(instruction: str, examples: list[SeedTask], language: str) -> Prompt:
    """Is `instruction` a classification task? Few-shot from seeds whose flag is known."""
    lang = _language(language)
    yes, no = DECISION_ANSWER[lang]
    shots = [(DECISION_QUESTION[lang].format(instruction=seed.instruction), yes if seed.is_classification else no)
             for seed in examples]
    return _build(DECISION_SYSTEM[lang], shots, DECISION_QUESTION[lang].format(instruction=instruction), "")


def instance_prompt(kind: str, instruction: str, examples: list[SeedTask], language: str) -> Prompt:
    """`kind` 'input_first' or 'output_first': few-shot from each seed's first instance."""
    if kind not in ("input_first", "output_first"):
        raise ValueError(f"unknown prompt kind {kind!r}")
    lang = _language(language)
    system = (OUTPUT_FIRST_SYSTEM if kind == "output_first" else INPUT_FIRST_SYSTEM)[lang]
    shots = [(TASK_LINE[lang].format(instruction=seed.instruction), _instance_text(kind, seed.instances[0], lang))
             for seed in examples if seed.instances]
    first_field = "label" if kind == "output_first" else "input"
    prefix = f"{LABEL[lang][first_field]}:"
    return _build(system, shots, TASK_LINE[lang].format(instruction=instruction), prefix)


def output_prompt(instruction: str, given: str, language: str) -> Prompt:
    """The follow-up for an answer that stopped after its input: the task and that input, nothing
    else. For chat it is exactly the user turn the instance becomes in training."""
    lang = _language(language)
    label = LABEL[lang]
    user = f"{instruction}\n\n{given}"
    text = f"{TASK_LINE[lang].format(instruction=instruction)}\n{label['input']}: {given}\n{label['output']}:"
    return Prompt(({"role": "user", "content": user},), text, "")


# ---------------------------------------------------------------- parsing answers


def _label_pattern(field_names: dict[str, tuple[str, ...]]) -> re.Pattern:
    names = sorted({name for names in field_names.values() for name in names}, key=len, reverse=True)
    alternatives = "|".join(re.escape(name) for name in names)
    # At a line start: optional markdown (#, >, -, *, **), the name, optional bold/number, a colon.
    return re.compile(rf"^[ \t#>*\-_]*(?P<name>{alternatives})[ \t*_]*(?:\d+[ \t*_]*)?[:：][ \t*_]*",
                      re.IGNORECASE | re.MULTILINE)


LABEL_RE = _label_pattern(FIELD_NAMES)  # any label, synonyms included: where an answer starts
PROMPT_LABEL_RE = _label_pattern(PROMPT_FIELD_NAMES)  # the prompts' own labels: what may end a field
_KIND_OF = {name.lower(): kind for kind, names in FIELD_NAMES.items() for name in names}


def _first_label(text: str) -> re.Match | None:
    """The answer's first label: a synonym when it opens the answer, else the first prompt label.

    A synonym further down ("…130円\n答え：130円") is part of the text, never a label.
    """
    opening = LABEL_RE.match(text, len(text) - len(text.lstrip("\r\n")))  # a line start: `^` holds there
    return opening or PROMPT_LABEL_RE.search(text)


def split_fields(text: str) -> dict[str, str]:
    """The first value of each field (`input`, `output`, `label`) in a labelled answer.

    A value runs to the next prompt label (PROMPT_FIELD_NAMES); a synonym counts only as the
    first label. A `task` label, or a field seen a second time, starts another example the
    model invented: parsing stops there.
    """
    fields: dict[str, str] = {}
    match = _first_label(text)
    while match is not None:
        kind = _KIND_OF[match.group("name").lower()]
        if kind == "task" or kind in fields:
            break
        following = PROMPT_LABEL_RE.search(text, match.end())
        fields[kind] = clean_value(text[match.end():following.start() if following else len(text)])
        match = following
    return fields


def clean_value(value: str) -> str:
    """Trim whitespace and markdown bold/quote marks that wrap a whole value."""
    value = value.strip()
    for mark in ("**", "`"):
        if len(value) > 2 * len(mark) and value.startswith(mark) and value.endswith(mark):
            value = value[len(mark):-len(mark)].strip()
    return value


def is_no_input(value: str) -> bool:
    core = value.strip().strip("()[]<>「」『』\"'*").rstrip(".。").strip().lower()
    return core in NO_INPUT_WORDS


@dataclass(frozen=True)
class ParsedInstance:
    input: str
    output: str  # "" when the answer had none: the stage rejects it as empty_output


def parse_input_first(answer: str) -> ParsedInstance:
    """`Input: ... Output: ...` -> (input, output). An answer with no labels at all is the output
    of a task without input (small models often just answer); one with an input but no output
    has no output."""
    fields = split_fields(answer)
    if "output" in fields:
        given = fields.get("input", "")
        return ParsedInstance("" if is_no_input(given) else given, fields["output"])
    if fields:
        return ParsedInstance("" if is_no_input(fields.get("input", "")) else fields.get("input", ""), "")
    return ParsedInstance("", clean_value(answer))


def parse_output_only(answer: str) -> str:
    """The answer to a follow-up: its `Output:` field if it labelled one, else the whole text
    (up to any example the model went on to invent)."""
    fields = split_fields(answer)
    if "output" in fields:
        return fields["output"]
    first = PROMPT_LABEL_RE.search(answer)
    return clean_value(answer if first is None else answer[:first.start()])


def parse_output_first(answer: str) -> ParsedInstance:
    """`Label: ... Input: ...` -> (input, output=label). `Output:` is accepted for the label."""
    fields = split_fields(answer)
    label = fields.get("label") or fields.get("output") or ""
    given = fields.get("input", "")
    return ParsedInstance("" if is_no_input(given) else given, label)


_NEGATIVE_JA = re.compile(r"ではありません|ではない|じゃない|ではないです")
_YES_NO = re.compile(r"\b(yes|no|true|false)\b|(はい|いいえ)", re.IGNORECASE)
_POSITIVE = {"yes", "true", "はい"}


def parse_yes_no(answer: str) -> bool | None:
    """The first yes/no word in the answer (English or Japanese); None when there is none."""
    match = _YES_NO.search(answer)
    if match:
        return match.group(0).lower() in _POSITIVE
    if _NEGATIVE_JA.search(answer):
        return False
    if re.search(r"分類タスクです", answer):
        return True
    return None


# ---------------------------------------------------------------- choosing few-shot examples

# Few-shot examples per prompt: enough to show the format and both answers, few enough that a
# 135M model with a short context still sees the task it is asked about.
NUM_DECISION_EXAMPLES = 4
NUM_INSTANCE_EXAMPLES = 3


def pick_decision_examples(seeds: list[SeedTask], language: str, rng, count: int = NUM_DECISION_EXAMPLES) -> list[SeedTask]:
    """Half classification seeds, half others, interleaved in a random order; `language` first."""
    yes = _sample_in_language(rng, [s for s in seeds if s.is_classification], language, (count + 1) // 2)
    no = _sample_in_language(rng, [s for s in seeds if not s.is_classification], language, count // 2)
    chosen = yes + no
    rng.shuffle(chosen)
    return chosen


def pick_instance_examples(seeds: list[SeedTask], language: str, classification: bool, rng,
                           count: int = NUM_INSTANCE_EXAMPLES) -> list[SeedTask]:
    """Seeds of the same kind (classification or not) in `language`; other seeds fill any gap."""
    usable = [s for s in seeds if s.instances]
    kind = [s for s in usable if s.is_classification == classification]
    chosen = _sample_in_language(rng, kind, language, count)
    if len(chosen) < count:
        rest = [s for s in usable if s not in chosen]
        chosen += _sample_in_language(rng, rest, language, count - len(chosen))
    return chosen


def _sample_in_language(rng, seeds: list[SeedTask], language: str, count: int) -> list[SeedTask]:
    """`count` seeds sampled at random, all in `language` when it has enough; other languages fill the gap."""
    same = [s for s in seeds if s.language == language]
    other = [s for s in seeds if s.language != language]
    chosen = rng.sample(same, min(count, len(same)))
    if len(chosen) < count:
        chosen += rng.sample(other, min(count - len(chosen), len(other)))
    return chosen
