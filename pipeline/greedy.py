"""Greedy answers of a causal LM to records' prompts, batched with left padding and cut at EOS:
what `eval` scores, and what `finetune --eval-generate` scores during training, so the two
generate the same way.

The prompt is `templates.prompt_ids`, the very ids training put before each response (not a
re-tokenized string), so the model continues the sequence it learnt to continue.
"""

from __future__ import annotations


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS (what training appended) and the model's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def generate_answers(model, tokenizer, records: list[dict], template: str, max_new_tokens: int,
                     batch_size: int, label: str) -> tuple[list[str], dict, list[list[int] | None]]:
    """Greedy answers to each record's prompt, cut at the first EOS, with their token ids
    (None for an answer that never reached EOS: it cannot equal a reference that ends)."""
    from transformers import GenerationConfig

    from pipeline.templates import prompt_ids

    prompts = [prompt_ids(r, template, tokenizer) for r in records]
    eos_ids = eos_token_ids(model, tokenizer)
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position of each row
    try:
        answers, counts, answer_ids = _generate(model, tokenizer, prompts, generation, eos_ids, batch_size, label)
    finally:
        tokenizer.padding_side = side  # the caller's tokenizer (finetune saves it) is left as it was
    return answers, counts, answer_ids


def _generate(model, tokenizer, prompts: list[list[int]], generation, eos_ids: list[int], batch_size: int,
              label: str) -> tuple[list[str], dict, list[list[int] | None]]:
    import torch
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    answer_ids: list[list[int] | None] = [None] * len(prompts)
    generated_tokens = hit_limit = 0
    with torch.inference_mode(), tqdm(total=len(prompts), desc=f"{label}: generate", unit="rec") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            enc = tokenizer.pad({"input_ids": [prompts[i] for i in batch]}, padding=True,
                                return_tensors="pt").to(model.device)
            out = model.generate(**enc, generation_config=generation)
            new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
            for row, i in enumerate(batch):
                ids = new_tokens[row]
                end = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                if end is None:
                    hit_limit += 1
                    end = len(ids)
                else:
                    answer_ids[i] = ids[:end]
                generated_tokens += end
                answers[i] = tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
            bar.update(len(batch))
    counts = {"generated_tokens": generated_tokens, "hit_max_new_tokens": hit_limit,
              "empty_predictions": sum(not a for a in answers)}
    return answers, counts, answer_ids
