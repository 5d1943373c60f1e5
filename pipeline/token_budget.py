"""What a token limit cuts, per language: `finetune`'s pre-flight and `eval`'s summary report it.

One limit does not cost every language the same. SmolLM2's tokenizer spends about 1.7 tokens
per Japanese character (measured on the Japanese seed tasks), so a Japanese record of a given
length in characters is several times longer in tokens than an English one of the same length
in words: on the seeds, `--max-length 512` cuts 5 of 131 Japanese records and no English one,
and 8 Japanese reference answers need more than 256 new tokens. A single total would hide
that, so both stages count per language:

- `truncated` / `dropped`: records cut at `--max-length` (dropped when no response token is
  left to train on or score);
- `answers_over_max_new_tokens` (eval): references whose tokens plus EOS exceed
  `--max-new-tokens`, which greedy decoding can therefore never reproduce in full.

Pure counting over already-encoded examples and a tokenizer; no stage imports another for it.
"""

from __future__ import annotations

from typing import Sequence

from pipeline.lang import language_of


def record_language(record: dict) -> str:
    """The language of a training record's request: its instruction, or its first user turn."""
    if "messages" in record:
        first_user = next((m.get("content", "") for m in record["messages"] if m.get("role") == "user"), "")
        return language_of(str(first_user))
    return language_of(record.get("instruction") or "")


def cuts_by_language(examples: Sequence, languages: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per language: records, and how many were truncated / dropped at the length limit.

    `examples` are `templates.EncodedExample`s (anything with `truncated` and `dropped`), in the
    order of `languages`.
    """
    if len(examples) != len(languages):
        raise ValueError(f"{len(examples)} examples for {len(languages)} languages")
    out: dict[str, dict[str, int]] = {}
    for example, lang in zip(examples, languages):
        counts = out.setdefault(lang, {"records": 0, "truncated": 0, "dropped": 0})
        counts["records"] += 1
        counts["truncated"] += bool(example.truncated)
        counts["dropped"] += bool(example.dropped)
    return dict(sorted(out.items()))


def answers_over_limit(tokenizer, answers: Sequence[str], languages: Sequence[str], limit: int) -> dict[str, int]:
    """Per language: answers whose tokens plus the EOS that ends them exceed `limit` new tokens."""
    out = {lang: 0 for lang in sorted(set(languages))}
    for answer, lang in zip(answers, languages):
        needed = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        out[lang] += needed > limit
    return out


def describe(by_language: dict[str, dict[str, int]]) -> str:
    """One line, `ja 5/131 truncated (3.8%), 0 dropped, ...; en 0/231 truncated ...`."""
    parts = []
    for lang, c in by_language.items():
        n = max(c["records"], 1)
        text = f"{lang} {c['truncated']}/{c['records']} truncated ({c['truncated'] / n:.1%}), {c['dropped']} dropped"
        if "answers_over_max_new_tokens" in c:
            text += f", {c['answers_over_max_new_tokens']} references longer than --max-new-tokens"
        parts.append(text)
    return "; ".join(parts)


def eval_cuts(tokenizer, records: Sequence[dict], references: Sequence[str], languages: Sequence[str],
              template: str, max_length: int, max_new_tokens: int) -> dict[str, dict[str, int]]:
    """What `eval` cuts, per language: truncated / dropped at `max_length`, and references
    longer than `max_new_tokens`."""
    from pipeline.templates import encode_example

    examples = [encode_example(r, tokenizer, template, max_length) for r in records]
    out = cuts_by_language(examples, languages)
    for lang, n in answers_over_limit(tokenizer, references, languages, max_new_tokens).items():
        out[lang]["answers_over_max_new_tokens"] = n
    return out
