"""Prompt templates and tokenization with loss masking, shared by `finetune` and `eval`.

Two templates:

- `alpaca`: Stanford Alpaca's two prompts (with and without an input), ending in
  `### Response:`; the output follows with nothing in between and ends with EOS.
- `chat`: the tokenizer's own chat template. An Alpaca record becomes one user turn
  (instruction, a blank line, input) and one assistant turn (output); a `messages` record
  (`{"messages": [{"role": ..., "content": ...}, ...]}`) is used as is, with loss on every
  assistant turn and system/user turns masked.

`serving_chat_template` is what `finetune` saves as the model's `chat_template`: for `alpaca`,
a template that renders one user turn to the Alpaca prompt, so a served model is prompted as
it was trained (for `chat` the tokenizer's own template already is).

`build_prompt(record, template, tokenizer)` is the text a model sees before it answers;
`prompt_ids` its token ids exactly as training saw them, so `eval` generates from the same
ids. `encode_example` returns `input_ids` and `labels` (-100 on every prompt token).

How the prompt/response boundary is found: each piece of text (prompt, response, the
template's glue between turns) is tokenized on its own and the ids are concatenated. Tokenizing
`prompt + response` as one string would let the BPE merge across the boundary (SmolLM2 turns
`### Response:` + `::x` into `... Response`, `::`, ...: the last prompt token changes), and
then neither a prefix length nor a longest-common-prefix gives a clean cut: a token that is
half prompt, half answer is either trained (the model learns to re-emit prompt text) or
masked (the first answer token is never learnt). Concatenating ids has no such token, and the
prompt ids in training are exactly the ids `prompt_ids` gives at inference, so the model
learns to continue precisely the sequence it will be given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TEMPLATES = ("alpaca", "chat")

IGNORE_INDEX = -100  # the label torch's cross_entropy skips (ignore_index default)

# Stanford Alpaca's prompts, verbatim: a model tuned on them (and users who prompt it that
# way) expects exactly this text, including the missing space after "### Response:".
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens; same length as input_ids (not shifted)
    num_prompt_tokens: int  # tokens before the first trained one
    truncated: bool = False  # cut at max_length
    dropped: bool = False  # no trained token left after truncation: unusable for training
    full_length: int = 0  # tokens before truncation (for reports)
    num_trained_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_trained_tokens = sum(label != IGNORE_INDEX for label in self.labels)


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


def user_text(record: dict) -> str:
    """The user turn of an Alpaca record for the chat template: instruction, blank line, input."""
    extra = (record.get("input") or "").strip()
    return record["instruction"] + ("\n\n" + extra if extra else "")


def alpaca_prompt(record: dict) -> str:
    if (record.get("input") or "").strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def to_messages(record: dict) -> list[dict]:
    """The conversation a record stands for: its `messages`, or the user/assistant pair of an Alpaca record."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    messages = [{"role": "user", "content": user_text(record)}]
    if record.get("output") is not None:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def build_prompt(record: dict, template: str, tokenizer) -> str:
    """The prompt text up to where the (first, for `messages`: next) response starts.

    For a `messages` record the prompt is every turn before the last assistant turn (or all of
    them if the last turn is not the assistant's), so eval can ask for the final answer.
    """
    check_template(template)
    if template == "alpaca":
        if "messages" in record:
            raise ValueError("a `messages` record needs the chat template (--template chat)")
        return alpaca_prompt(record)
    messages = to_messages(record)
    if "messages" in record:
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        messages = messages[:1]
    return _render(tokenizer, messages, add_generation_prompt=True)


def prompt_ids(record: dict, template: str, tokenizer) -> list[int]:
    """The prompt's token ids exactly as `encode_example` puts them before the response.

    Alpaca prompts get the tokenizer's usual special tokens (a BOS for Llama-style
    tokenizers); chat templates write their own special tokens into the text, so adding
    them again would double the BOS.
    """
    text = build_prompt(record, template, tokenizer)
    return tokenizer(text, add_special_tokens=(template == "alpaca")).input_ids


def _bos_text(tokenizer) -> str:
    """The text of the special tokens the tokenizer puts before a text (Llama's BOS; none for SmolLM2)."""
    plain = tokenizer("x", add_special_tokens=False).input_ids
    marked = tokenizer("x", add_special_tokens=True).input_ids
    prefix = marked[: len(marked) - len(plain)] if marked[-len(plain):] == plain else []
    return tokenizer.decode(prefix) if prefix else ""


def alpaca_chat_template(tokenizer) -> str:
    """A Jinja chat template that prompts a model tuned with `--template alpaca` the way it learnt.

    A single user turn renders to exactly `alpaca_prompt({"instruction": content})` with the
    special tokens `prompt_ids` adds, so a server's chat endpoint (vLLM, Ollama, TGI), which
    tokenizes the rendering without adding special tokens, gives the very prompt ids training
    used. A chat message has no separate `input`: the whole user turn is the instruction.
    Earlier turns, if any, follow the same pattern with each answer ending in EOS.
    """
    head, tail = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    for text in (head, tail):
        if any(marker in text for marker in ("{{", "{%", "{#")):
            raise ValueError("the Alpaca prompt holds Jinja markers and cannot be a chat template as is")
    bos = _bos_text(tokenizer).replace("'", "\\'")
    # No whitespace between tags: transformers renders with trim_blocks, which would eat a
    # newline written right after a tag.
    return ("{{ '" + bos + "' }}{% for message in messages %}{% if message['role'] == 'user' %}" + head
            + "{{ message['content'] }}" + tail + "{% elif message['role'] == 'assistant' %}"
            "{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def serving_chat_template(tokenizer, template: str) -> str | None:
    """The chat template a model trained with `template` should be saved with (None: keep the tokenizer's)."""
    check_template(template)
    return alpaca_chat_template(tokenizer) if template == "alpaca" else None


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool, bool]]:
    """Split the rendered conversation into (text, trained, append_eos) pieces.

    Each assistant turn is found as the difference between the rendering that ends with a
    generation prompt before it and the rendering that includes it, so the prompt part is the
    very text `build_prompt` gives. The trained part runs through the end-of-turn token (the
    tokenizer's EOS string) when the template writes one; what follows it (a newline) is glue
    and masked. A template that writes no EOS gets one appended (`append_eos`), so the model
    still learns to stop.
    """
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool, bool]] = []
    done = ""  # text rendered so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not render a conversation as a prefix of its "
                             "continuation, so turns cannot be masked by text; use --template alpaca")
        segments.append((prompt[len(done):], False, False))
        answer = full[len(prompt):]
        content = message["content"].strip()
        after = answer.find(content) + len(content) if content and content in answer else 0
        cut = answer.find(eos, after) if eos else -1
        if cut >= 0:
            cut += len(eos)
            segments += [(answer[:cut], True, False), (answer[cut:], False, False)]
        else:
            segments.append((answer, True, True))
        done = full
    return segments


def encode_example(record: dict, tokenizer, template: str, max_length: int) -> EncodedExample:
    """Token ids and labels for one record; labels are IGNORE_INDEX on every prompt token.

    The response ends with EOS (trained). Sequences longer than `max_length` are cut at the
    end; if that leaves no trained token the example is `dropped`.
    """
    check_template(template)
    if template == "alpaca":
        if "messages" in record:
            raise ValueError("a `messages` record needs the chat template (--template chat)")
        ids = prompt_ids(record, template, tokenizer)
        labels = [IGNORE_INDEX] * len(ids)
        answer = _ids(tokenizer, record.get("output") or "") + [tokenizer.eos_token_id]
        ids += answer
        labels += answer
    else:
        ids, labels = [], []
        for text, trained, append_eos in _chat_segments(to_messages(record), tokenizer):
            piece = _ids(tokenizer, text) + ([tokenizer.eos_token_id] if append_eos else [])
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        # Glue after the last answer (a newline) is never trained: computing it is waste.
        while labels and labels[-1] == IGNORE_INDEX and any(label != IGNORE_INDEX for label in labels):
            ids.pop()
            labels.pop()
    num_prompt = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    truncated = len(ids) > max_length
    example = EncodedExample(ids[:max_length], labels[:max_length], num_prompt_tokens=min(num_prompt, max_length),
                             truncated=truncated, full_length=len(ids))
    example.dropped = example.num_trained_tokens == 0
    return example
