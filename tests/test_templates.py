"""Prompt templates and loss masking, on hand-written records with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from pipeline.templates import (
    ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, TEMPLATES, alpaca_chat_template, build_prompt, encode_example, prompt_ids,
    serving_chat_template,
)


@pytest.fixture(scope="module")
def tok(embedded_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir)


def trained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_templates_listed():
    assert TEMPLATES == ("alpaca", "chat")


def test_alpaca_prompts_with_and_without_input(tok):
    with_input = build_prompt({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca", tok)
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:")
    assert "paired with an input" in with_input
    without = build_prompt({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", tok)
    assert without == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input" not in without


def test_alpaca_masks_prompt_and_trains_response_and_eos(tok):
    record = {"instruction": "Say hi.", "output": "Hello there"}
    ex = encode_example(record, tok, "alpaca", max_length=512)
    n = len(prompt_ids(record, "alpaca", tok))
    assert ex.num_prompt_tokens == n
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id
    assert trained_text(tok, ex) == "Hello there" + tok.eos_token
    assert not ex.truncated and not ex.dropped and ex.num_trained_tokens == len(ex.input_ids) - n


def test_fused_colon_boundary_is_exact(tok):
    """`### Response:` + `::x` tokenizes as `Response`, `::` in one string: the ':' fuses."""
    record = {"instruction": "Write a C++ scope operator.", "output": "::value"}
    prompt = build_prompt(record, "alpaca", tok)
    whole = tok(prompt + record["output"], add_special_tokens=False).input_ids
    alone = tok(prompt, add_special_tokens=False).input_ids
    assert whole[: len(alone)] != alone  # the merge really happens with this tokenizer
    ex = encode_example(record, tok, "alpaca", max_length=512)
    # The prompt ids are exactly those the model is given at inference, all masked ...
    assert ex.input_ids[: ex.num_prompt_tokens] == alone
    assert set(ex.labels[: ex.num_prompt_tokens]) == {IGNORE_INDEX}
    # ... and every response token, including the first ':', is trained.
    assert trained_text(tok, ex) == "::value" + tok.eos_token


def test_truncation_and_dropped(tok):
    record = {"instruction": "Repeat.", "output": "word " * 50}
    n = len(prompt_ids(record, "alpaca", tok))
    cut = encode_example(record, tok, "alpaca", max_length=n + 3)
    assert cut.truncated and not cut.dropped
    assert len(cut.input_ids) == n + 3 and cut.num_trained_tokens == 3
    gone = encode_example(record, tok, "alpaca", max_length=n - 1)
    assert gone.truncated and gone.dropped and gone.num_trained_tokens == 0


def test_empty_output_trains_only_eos(tok):
    ex = encode_example({"instruction": "Say nothing.", "output": ""}, tok, "alpaca", max_length=512)
    assert [label for label in ex.labels if label != IGNORE_INDEX] == [tok.eos_token_id]


def test_chat_prompt_and_masking(tok):
    record = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    prompt = build_prompt(record, "chat", tok)
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "Add.\n\n2 and 3"}],
                                             tokenize=False, add_generation_prompt=True)
    ex = encode_example(record, tok, "chat", max_length=512)
    assert ex.input_ids[: ex.num_prompt_tokens] == prompt_ids(record, "chat", tok)
    assert trained_text(tok, ex) == "5" + tok.eos_token
    assert ex.input_ids[-1] == tok.eos_token_id


def test_chat_three_turns_trains_exactly_the_assistant_turns(tok):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ex = encode_example(record, tok, "chat", max_length=512)
    # The ids are the whole rendered conversation (its trailing newline aside).
    full = tok.apply_chat_template(record["messages"], tokenize=False)
    assert tok.decode(ex.input_ids) == full.rstrip("\n")
    # Trained runs, read off the labels: each assistant answer with its end-of-turn token.
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    assert runs == [f"{a}{tok.eos_token}" for a in ("Paris.", "Madrid.", "You're welcome.")]
    # The prompt for the last answer is what build_prompt gives eval.
    last_prompt = build_prompt(record, "chat", tok)
    assert full.startswith(last_prompt) and last_prompt.endswith("<|im_start|>assistant\n")


def test_messages_record_needs_chat_template(tok):
    with pytest.raises(ValueError, match="chat template"):
        encode_example({"messages": [{"role": "user", "content": "hi"}]}, tok, "alpaca", max_length=64)


# A served model gets one user turn; the instruction alone, as a chat client sends it.
SERVED_RECORDS = [{"instruction": "Name three primary colours.", "output": "Red, yellow, blue."},
                  {"instruction": "日本の首都はどこですか？", "output": "東京です。"}]


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_saved_chat_template_renders_the_training_prompt(tok, template):
    """What vLLM/Ollama send for one user turn is exactly the prompt ids training put before the answer."""
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(tok.name_or_path)
    saved = serving_chat_template(served, template)
    if saved is not None:
        served.chat_template = saved
    for record in SERVED_RECORDS:
        ids = served.apply_chat_template([{"role": "user", "content": record["instruction"]}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        example = encode_example(record, tok, template, max_length=512)
        assert ids == prompt_ids(record, template, tok) == example.input_ids[: example.num_prompt_tokens]
    if template == "alpaca":
        # The tokenizer's own (ChatML) template would prompt the Alpaca-tuned model in a format it never saw.
        assert "<|im_start|>" not in served.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_the_alpaca_chat_template_writes_the_bos_a_llama_tokenizer_adds(tok):
    """prompt_ids gives Alpaca prompts the tokenizer's special tokens; the template must write them as text."""
    from transformers import AutoTokenizer

    llama_like = AutoTokenizer.from_pretrained(tok.name_or_path)
    llama_like.add_bos_token = True  # SmolLM2 adds none; a Llama tokenizer adds <s>
    record = SERVED_RECORDS[1]
    if llama_like(record["instruction"]).input_ids[0] != llama_like.bos_token_id:
        pytest.skip("this tokenizer does not honour add_bos_token")
    llama_like.chat_template = alpaca_chat_template(llama_like)
    ids = llama_like.apply_chat_template([{"role": "user", "content": record["instruction"]}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    assert ids == prompt_ids(record, "alpaca", llama_like) and ids[0] == llama_like.bos_token_id
