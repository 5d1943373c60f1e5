"""The measures `eval` reports, as pure functions: loss and token accuracy from logits; sequence
accuracy, exact match, BLEU, chrF and ROUGE-1/2/L from texts; each record may have several
references (records sharing instruction and input), and a record's score is its best one.

- Teacher-forced: `token_sums(logits, labels)` sums cross-entropy and argmax hits over the
  response tokens only (labels != -100), per row, so a whole set's loss is token-weighted
  the way training weighs it.
- `sequence_accuracy` is strict: the answer is the reference, token for token. `eval` compares
  generated token ids with the reference's; on texts alone (`same_text`) the two must be
  identical after stripping the ends, so a changed inner space is a miss.
- `exact_match` is the normalised comparison: NFKC (full-width digits and letters become
  ASCII), whitespace collapsed, spaces next to a CJK character dropped and trailing 。．.!！
  dropped, so 「肯定。」 matches 「肯定」 and 「３６００円」 matches 「3600円」.
- `label_accuracy` is `exact_match` on classification records only (the label is the answer).
- BLEU is sacrebleu's corpus BLEU. Each segment is tokenized the way its language needs
  (`13a` for English and other space-separated text, `ja-mecab` for Japanese, `zh` for
  Chinese), then the pre-tokenized corpus is scored with `tokenize="none"`: on a one-language
  set this is exactly `sacrebleu.corpus_bleu(..., tokenize=that tokenizer)`, and a mixed set
  gets one corpus BLEU from the n-gram counts and lengths pooled over every segment (never a
  mean of the languages' scores), in which no English word is split into letters and no
  Japanese sentence counts as one word. Japanese BLEU is always `ja-mecab` (MeCab + IPAdic,
  from the `sacrebleu[ja]` dependency): a score must not change with what happens to be
  installed (character BLEU gave 77.8 on a set where `ja-mecab` gives 65.6).
- chrF is sacrebleu's corpus chrF (character 6-grams, beta 2, spaces ignored): it needs no
  tokenizer, so it means the same thing in every language and on a mixed set.
- ROUGE-1, ROUGE-2 and ROUGE-L, each as F1 with its precision (share of the answer's n-grams,
  or LCS, found in the reference) and recall (share of the reference's found in the answer,
  ROUGE's original sense), on `pipeline.similarity`'s `characters` tokens: rouge_score's tokens
  on English text (so its `rouge1`/`rouge2`/`rougeL` scores), one token per kana or kanji on
  Japanese. Not the filter's `multilingual` Japanese tokens, which strip the request frame and
  fold kanji into readings to find duplicate requests: an answer is scored on what it
  literally says. ROUGE-L F1 is `similarity.rouge_l` (the one ROUGE-L of the project). A set's
  ROUGE is the mean over its records; with several references a record takes the reference
  with the best F1 (and its precision and recall), as rouge_score's multi-reference scoring.
- Several references: BLEU and chrF pass them to sacrebleu as extra reference streams (its
  multi-reference scoring); the match measures count a record matched if any reference matches.
- Slices (`slice_metrics`): the same measures on a subset of the records (one language, one
  task kind, one source); a measure with nothing to score in a slice is left out, never 0.

torch, sacrebleu and the similarity module are imported inside the functions that use them.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from pipeline.lang import language_of
from pipeline.templates import IGNORE_INDEX  # the label of prompt and padding positions


BLEU_TOKENIZE_DEFAULT = "13a"  # sacrebleu's default, the WMT standard for space-separated text
# Languages written without spaces get word n-grams from their own segmenter: MeCab with
# IPAdic for Japanese (installed by the `sacrebleu[ja]` dependency), sacrebleu's `zh` for Chinese.
BLEU_TOKENIZE = {"ja": "ja-mecab", "zh": "zh"}
# Trailing sentence-final marks the normalised exact match ignores, as they look after NFKC
# (．→.  ！→!  ｡→。): 「肯定。」 and 「肯定」 are the same answer.
TRAILING_MARKS = "。.!"
# A space beside one of these is dropped by the normalised match: Japanese writes no spaces
# between words, so 「3600 円」 is 「3600円」 (kana, kanji, ー and CJK punctuation; not hangul,
# since Korean does separate words with spaces).
_SPACE_BESIDE_JAPANESE = r"(?<=[\p{Han}\p{Hiragana}\p{Katakana}ー\u3001-\u303F]) | (?=[\p{Han}\p{Hiragana}\p{Katakana}ー\u3001-\u303F])"
_space_beside_japanese = None
ROUGE_ORDERS = (1, 2)  # the n-gram ROUGE variants reported beside ROUGE-L
# A record's reference answer, or all of them when several records share its instruction and input.
References = Sequence[Union[str, Sequence[str]]]


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


def collapse_whitespace(text: str) -> str:
    """Trimmed, with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


def normalize_answer(text: str) -> str:
    """What `exact_match` compares: NFKC, whitespace collapsed and dropped next to a CJK character
    (Japanese puts no spaces between words), trailing 。．.!！ removed."""
    global _space_beside_japanese
    if _space_beside_japanese is None:
        import regex  # the stdlib `re` has no Unicode script classes

        _space_beside_japanese = regex.compile(_SPACE_BESIDE_JAPANESE)
    text = collapse_whitespace(unicodedata.normalize("NFKC", text))
    return _space_beside_japanese.sub("", text).rstrip(TRAILING_MARKS + " ")


def same_text(prediction: str, reference: str) -> bool:
    """Strict, on texts: identical once the ends are stripped (`sequence_accuracy` without token ids)."""
    return prediction.strip() == reference.strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Normalised: equal after `normalize_answer` (width, spaces, trailing marks)."""
    return normalize_answer(prediction) == normalize_answer(reference)


def reference_lists(references: References) -> list[list[str]]:
    """Each record's references as a list (a lone string is one reference)."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def matches_any(match: Callable[[str, str], bool], prediction: str, references: Sequence[str] | str) -> bool:
    refs = [references] if isinstance(references, str) else references
    return any(match(prediction, r) for r in refs)


def match_rate(predictions: Sequence[str], references: References, match=exact_match) -> float:
    """Share of records whose prediction matches one of its references under `match`."""
    _check_pairs(predictions, references)
    return sum(matches_any(match, p, r) for p, r in zip(predictions, references)) / len(references)


def bleu_tokenize_for(language: str) -> str:
    """sacrebleu's tokenizer name for a language from `pipeline.lang.language_of`."""
    return BLEU_TOKENIZE.get(language, BLEU_TOKENIZE_DEFAULT)


def bleu_tokenizer_signature(language: str) -> str:
    """The tokenizer with its version, as sacrebleu's signature writes it (`ja-mecab-0.996-IPA`)."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=bleu_tokenize_for(language)).tokenizer.signature()


def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every record's k-th reference, None where it has fewer."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(predictions: Sequence[str], references: References,
                languages: Sequence[str] | None = None) -> float:
    """sacrebleu corpus BLEU (0-100), each segment tokenized for the language of its (first) reference."""
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references)
    refs = reference_lists(references)
    if languages is None:
        languages = [language_of(r[0]) for r in refs]
    tokenizers = {lang: BLEU(tokenize=bleu_tokenize_for(lang)).tokenizer for lang in set(languages)}
    # sacrebleu strips trailing whitespace before tokenizing; doing the same keeps the
    # pre-tokenized score identical to its own on a one-language set.
    hyps = [tokenizers[lang](p.rstrip()) for p, lang in zip(predictions, languages)]
    tokenized = [[tokenizers[lang](r.rstrip()) for r in rs] for rs, lang in zip(refs, languages)]
    return BLEU(tokenize="none").corpus_score(hyps, _reference_streams(tokenized)).score


def corpus_chrf(predictions: Sequence[str], references: References) -> float:
    """sacrebleu corpus chrF (0-100): character n-grams, so no tokenizer and no language needed."""
    from sacrebleu.metrics import CHRF

    _check_pairs(predictions, references)
    return CHRF().corpus_score(list(predictions), _reference_streams(reference_lists(references))).score


@dataclass(frozen=True)
class PRF:
    """One ROUGE score: precision (of the answer), recall (of the reference) and their F1."""

    precision: float
    recall: float
    f1: float


def _answer_tokens(text: str) -> list[str]:
    from pipeline.similarity import tokenize

    return tokenize(text, tokenizer="characters")


def _prf(overlap: int, predicted: int, wanted: int) -> PRF:
    precision = overlap / predicted if predicted else 0.0
    recall = overlap / wanted if wanted else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PRF(precision, recall, f1)


def rouge_n(prediction: str, reference: str, n: int) -> PRF:
    """ROUGE-N on `characters` tokens: clipped n-gram overlap over the answer's and the reference's n-grams."""
    from collections import Counter

    def grams(tokens: list[str]) -> Counter:
        return Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))

    ours, theirs = grams(_answer_tokens(prediction)), grams(_answer_tokens(reference))
    return _prf(sum((ours & theirs).values()), sum(ours.values()), sum(theirs.values()))


def rouge_l(prediction: str, reference: str) -> PRF:
    """ROUGE-L on `characters` tokens: the longest common subsequence over each side's length;
    F1 is `pipeline.similarity.rouge_l`'s, so it is the project's one ROUGE-L."""
    from rapidfuzz.distance import Indel

    from pipeline.similarity import rouge_l as rouge_l_f

    ours, theirs = _answer_tokens(prediction), _answer_tokens(reference)
    if not ours or not theirs:
        return PRF(0.0, 0.0, 0.0)
    lcs = (len(ours) + len(theirs) - Indel.distance(ours, theirs)) // 2
    return PRF(lcs / len(ours), lcs / len(theirs), rouge_l_f(ours, theirs))


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on `characters` tokens (rouge_score's on ASCII, one per CJK character); 0 when either
    side has no token (as rouge_score). Not the filter's `multilingual` tokens: those drop a
    Japanese request's frame, which in an answer is content to be scored."""
    return rouge_l(prediction, reference).f1


def best_rouge(score: Callable[[str, str], PRF], prediction: str, references: Sequence[str] | str) -> PRF:
    """The score against the reference it fits best (highest F1), as rouge_score does with several."""
    refs = [references] if isinstance(references, str) else references
    return max((score(prediction, r) for r in refs), key=lambda s: s.f1)


def rouge_scores(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Mean rouge_1, rouge_2 and rouge_l F1 over records, each with `_precision` and `_recall`."""
    _check_pairs(predictions, references)
    scorers = {f"rouge_{n}": (lambda p, r, n=n: rouge_n(p, r, n)) for n in ROUGE_ORDERS}
    scorers["rouge_l"] = rouge_l
    out: dict[str, float] = {}
    for name, scorer in scorers.items():
        scores = [best_rouge(scorer, p, r) for p, r in zip(predictions, references)]
        out[name] = sum(s.f1 for s in scores) / len(scores)
        out[f"{name}_precision"] = sum(s.precision for s in scores) / len(scores)
        out[f"{name}_recall"] = sum(s.recall for s in scores) / len(scores)
    return out


def mean_rouge_l(predictions: Sequence[str], references: References) -> float:
    _check_pairs(predictions, references)
    return sum(best_rouge(rouge_l, p, r).f1 for p, r in zip(predictions, references)) / len(references)


def generation_metrics(predictions: Sequence[str], references: References,
                       languages: Sequence[str] | None = None,
                       sequence_hits: Sequence[bool] | None = None) -> dict[str, float]:
    """The text measures of a set: sequence_accuracy (from `sequence_hits` when given, else
    `same_text` against any reference), exact_match, bleu, chrf and rouge_1/2/l with precision
    and recall."""
    _check_pairs(predictions, references)
    if sequence_hits is None:
        sequence_hits = [matches_any(same_text, p, r) for p, r in zip(predictions, references)]
    return {
        "sequence_accuracy": sum(sequence_hits) / len(sequence_hits),
        "exact_match": match_rate(predictions, references),
        "bleu": corpus_bleu(predictions, references, languages),
        "chrf": corpus_chrf(predictions, references),
        **rouge_scores(predictions, references),
    }


def slice_metrics(indices: Sequence[int], predictions: Sequence[str], references: References,
                  languages: Sequence[str], sequence_hits: Sequence[bool] | None = None,
                  classification: bool = False) -> dict[str, float]:
    """The measures of the records at `indices`: `label_accuracy` alone for a classification
    slice (a label is right or wrong; n-gram overlap of one word says nothing more), else the
    text measures. Empty for an empty slice: a measure that does not apply is left out."""
    if not indices:
        return {}
    preds = [predictions[i] for i in indices]
    refs = [references[i] for i in indices]
    if classification:
        return {"label_accuracy": match_rate(preds, refs)}
    hits = None if sequence_hits is None else [sequence_hits[i] for i in indices]
    return generation_metrics(preds, refs, [languages[i] for i in indices], hits)


def _check_pairs(predictions: Sequence[str], references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
