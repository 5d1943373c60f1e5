"""The measures `eval` reports, as pure functions: loss and token accuracy from logits, exact
match, BLEU and ROUGE-L from texts.

- Teacher-forced: `token_sums(logits, labels)` sums cross-entropy and argmax hits over the
  response tokens only (labels != -100), per row, so a whole set's loss is token-weighted
  the way training weighs it.
- Exact match compares texts after trimming and collapsing whitespace.
- BLEU is sacrebleu's corpus BLEU. Each segment is tokenized the way its language needs
  (`13a` for English; `ja-mecab` where installed, else `char`, for Japanese), then the
  pre-tokenized corpus is scored with `tokenize="none"`: on a one-language set this is exactly
  `sacrebleu.corpus_bleu(..., tokenize=that tokenizer)`, and a mixed set gets one corpus BLEU
  in which no English word is split into letters and no Japanese sentence counts as one word.
  `bleu_by_language` gives each language group's own corpus BLEU beside it.
- ROUGE-L F1 uses the near-duplicate filter's multilingual tokenizer (`pipeline.similarity`),
  which on English text gives rouge_score's `rougeL` F-measure.

torch, sacrebleu and the similarity module are imported inside the functions that use them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Sequence

from pipeline.lang import language_of
from pipeline.templates import IGNORE_INDEX  # the label of prompt and padding positions


BLEU_TOKENIZE_EN = "13a"  # sacrebleu's default, the WMT standard for space-separated text
BLEU_TOKENIZE_JA_FALLBACK = "char"  # needs no extra package; `ja-mecab` gives word n-grams when installed
# The packages sacrebleu's `ja-mecab` tokenizer needs (`pip install sacrebleu[ja]`).
MECAB_MODULES = ("MeCab", "ipadic")


@dataclass(frozen=True)
class TokenSums:
    """Per-row sums over response tokens: cross-entropy (nats), argmax hits, token count."""

    loss: list[float]
    correct: list[int]
    tokens: list[int]


def token_sums(logits, labels) -> TokenSums:
    """Cross-entropy and argmax hits of a causal LM over the positions whose label is not -100.

    `labels` are aligned with the model's input (as Hugging Face models take them): the
    logits at position t predict the label at t + 1. `logits` may cover only the last K
    positions (`logits_to_keep=K`); then pass the labels of the same last K positions.
    """
    import torch
    import torch.nn.functional as F

    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up")
    predicted = logits[:, :-1, :]
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    # Only the response positions go through log-softmax: with a 49k vocabulary the full
    # float32 copy of every position would cost more memory than the model.
    rows = mask.nonzero(as_tuple=True)[0]
    picked = predicted[mask].float()
    wanted = target[mask]
    losses = F.cross_entropy(picked, wanted, reduction="none")
    hits = (picked.argmax(dim=-1) == wanted).long()
    batch = labels.shape[0]
    loss = torch.zeros(batch, dtype=torch.float64).index_add_(0, rows, losses.double())
    correct = torch.zeros(batch, dtype=torch.long).index_add_(0, rows, hits)
    return TokenSums(loss.tolist(), correct.tolist(), mask.sum(dim=1).tolist())


def teacher_forced_metrics(loss_sum: float, correct: int, tokens: int) -> dict[str, float]:
    """Mean response cross-entropy, perplexity and token accuracy; empty when no token was scored."""
    if tokens == 0:
        return {}
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": correct / tokens}


def normalize_text(text: str) -> str:
    """Trimmed, with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_text(prediction) == normalize_text(reference)


def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_pairs(predictions, references)
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)


def bleu_tokenize_for(language: str) -> str:
    """sacrebleu's tokenizer name for a language from `pipeline.lang.language_of`."""
    if language == "ja":
        if all(importlib.util.find_spec(name) is not None for name in MECAB_MODULES):
            return "ja-mecab"
        return BLEU_TOKENIZE_JA_FALLBACK
    return BLEU_TOKENIZE_EN


def corpus_bleu(predictions: Sequence[str], references: Sequence[str],
                languages: Sequence[str] | None = None) -> float:
    """sacrebleu corpus BLEU (0-100), each segment tokenized for the language of its reference."""
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references)
    if languages is None:
        languages = [language_of(r) for r in references]
    tokenizers = {lang: BLEU(tokenize=bleu_tokenize_for(lang)).tokenizer for lang in set(languages)}
    # sacrebleu strips trailing whitespace before tokenizing; doing the same keeps the
    # pre-tokenized score identical to its own on a one-language set.
    hyps = [tokenizers[lang](p.rstrip()) for p, lang in zip(predictions, languages)]
    refs = [tokenizers[lang](r.rstrip()) for r, lang in zip(references, languages)]
    return BLEU(tokenize="none").corpus_score(hyps, [refs]).score


def bleu_by_language(predictions: Sequence[str], references: Sequence[str],
                     languages: Sequence[str]) -> dict[str, float]:
    """Each language group's own corpus BLEU, keyed by language."""
    _check_pairs(predictions, references)
    out = {}
    for lang in sorted(set(languages)):
        idx = [i for i, x in enumerate(languages) if x == lang]
        out[lang] = corpus_bleu([predictions[i] for i in idx], [references[i] for i in idx], [lang] * len(idx))
    return out


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on the filter's multilingual tokens; 0 when either side has no token (as rouge_score)."""
    from pipeline.similarity import rouge_l, tokenize

    pred_tokens = tokenize(prediction, tokenizer="multilingual")
    ref_tokens = tokenize(reference, tokenizer="multilingual")
    if not pred_tokens or not ref_tokens:
        return 0.0
    return rouge_l(pred_tokens, ref_tokens)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_pairs(predictions, references)
    return sum(rouge_l_f1(p, r) for p, r in zip(predictions, references)) / len(references)


def generation_metrics(predictions: Sequence[str], references: Sequence[str],
                       languages: Sequence[str] | None = None) -> dict[str, float]:
    """exact_match, bleu and rouge_l of a set, plus `bleu_<lang>` for each group of a mixed set."""
    _check_pairs(predictions, references)
    if languages is None:
        languages = [language_of(r) for r in references]
    metrics = {
        "exact_match": exact_match_rate(predictions, references),
        "bleu": corpus_bleu(predictions, references, languages),
        "rouge_l": mean_rouge_l(predictions, references),
    }
    if len(set(languages)) > 1:
        for lang, score in bleu_by_language(predictions, references, languages).items():
            metrics[f"bleu_{lang}"] = score
    return metrics


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
