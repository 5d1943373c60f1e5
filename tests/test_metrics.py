"""The eval measures on fixed cases: hand-computed loss and accuracy, and BLEU / ROUGE-L against
sacrebleu and rouge_score themselves."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from pipeline import metrics as M

ENGLISH_REFS = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "Water boils at 100 degrees Celsius at sea level.",
    "She sells sea shells by the sea shore.",
    "1, 2, 3, 4 and 5 are the first five positive integers.",
]
ENGLISH_PREDS = [
    "The cat is sitting on the mat.",
    "Paris is the capital of France.",
    "At sea level, water boils at 100 degrees.",
    "She sells shells on the shore!",
    "The first five positive integers are 1, 2, 3, 4, 5.",
]
JAPANESE_REFS = ["私は猫が好きです。", "東京は日本の首都です。", "今日はとても良い天気ですね。", "富士山は日本で一番高い山です。"]
JAPANESE_PREDS = ["私は犬が好きです。", "日本の首都は東京です。", "今日は良い天気です。", "富士山は一番高い山です。"]


def test_token_sums_on_hand_computed_logits():
    # Row 0: positions 1 and 2 are response tokens (labels 1, 2); row 1: only position 2 (label 0).
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 0]])
    logits = torch.tensor([
        [[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [9.0, 9.0, 9.0]],  # predicts 1 (right), then 0 (wrong)
        [[5.0, 0.0, 0.0], [3.0, 0.0, 0.0], [9.0, 9.0, 9.0]],  # position 0 is a prompt label: ignored
    ])
    sums = M.token_sums(logits, labels)
    row0 = -math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (math.e + 2))
    row1 = -math.log(math.exp(3) / (math.exp(3) + 2))
    assert sums.tokens == [2, 1]
    assert sums.correct == [1, 1]
    assert sums.loss == pytest.approx([row0, row1], abs=1e-6)

    result = M.teacher_forced_metrics(sum(sums.loss), sum(sums.correct), sum(sums.tokens))
    assert result["loss"] == pytest.approx((row0 + row1) / 3)
    assert result["perplexity"] == pytest.approx(math.exp((row0 + row1) / 3))
    assert result["token_accuracy"] == pytest.approx(2 / 3)


def test_token_sums_match_torch_cross_entropy_and_a_kept_suffix():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    sums = M.token_sums(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    assert sum(sums.loss) == pytest.approx(float(expected), rel=1e-6)
    # logits_to_keep=K: the last K positions, from the one before the first response token on.
    tail = M.token_sums(logits[:, 2:], labels[:, 2:])
    assert tail.loss == pytest.approx(sums.loss) and tail.correct == sums.correct and tail.tokens == sums.tokens


def test_no_scored_token_means_no_teacher_forced_measure():
    assert M.teacher_forced_metrics(0.0, 0, 0) == {}


def test_exact_match_trims_and_collapses_whitespace_only():
    assert M.exact_match("  Paris\n", "Paris")
    assert M.exact_match("a  b\n\t c", "a b c")
    assert not M.exact_match("Paris.", "Paris")
    assert not M.exact_match("paris", "Paris")
    assert M.exact_match_rate(["  Paris\n", "a  b", "Rome"], ["Paris", "a b", "Roma"]) == pytest.approx(2 / 3)


def test_bleu_equals_sacrebleu_on_english():
    expected = sacrebleu.corpus_bleu(ENGLISH_PREDS, [ENGLISH_REFS]).score
    assert 0 < expected < 100
    assert M.corpus_bleu(ENGLISH_PREDS, ENGLISH_REFS) == pytest.approx(expected)


def test_bleu_equals_sacrebleu_on_japanese():
    tokenize = M.bleu_tokenize_for("ja")
    assert tokenize in ("char", "ja-mecab")
    expected = sacrebleu.corpus_bleu(JAPANESE_PREDS, [JAPANESE_REFS], tokenize=tokenize).score
    assert 0 < expected < 100
    assert M.corpus_bleu(JAPANESE_PREDS, JAPANESE_REFS) == pytest.approx(expected)


def test_mixed_set_reports_each_language_and_one_overall_score():
    preds, refs = ENGLISH_PREDS + JAPANESE_PREDS, ENGLISH_REFS + JAPANESE_REFS
    result = M.generation_metrics(preds, refs)
    assert result["bleu_en"] == pytest.approx(sacrebleu.corpus_bleu(ENGLISH_PREDS, [ENGLISH_REFS]).score)
    assert result["bleu_ja"] == pytest.approx(M.corpus_bleu(JAPANESE_PREDS, JAPANESE_REFS))
    assert min(result["bleu_en"], result["bleu_ja"]) <= result["bleu"] <= max(result["bleu_en"], result["bleu_ja"])
    assert M.generation_metrics(refs, refs)["bleu"] == pytest.approx(100)
    # One language: no per-language keys that would only repeat `bleu`.
    assert set(M.generation_metrics(ENGLISH_PREDS, ENGLISH_REFS)) == {"exact_match", "bleu", "rouge_l"}


def test_rouge_l_equals_rouge_score_on_english():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = list(zip(ENGLISH_PREDS, ENGLISH_REFS)) + [("", "something"), ("Hello, World!", "hello world")]
    for prediction, reference in pairs:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert M.rouge_l_f1(prediction, reference) == pytest.approx(expected), (prediction, reference)
    expected_mean = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(ENGLISH_PREDS, ENGLISH_REFS)) / len(ENGLISH_REFS)
    assert M.mean_rouge_l(ENGLISH_PREDS, ENGLISH_REFS) == pytest.approx(expected_mean)


def test_japanese_pair_one_character_apart_scores_high_not_zero():
    prediction, reference = "私は犬が好きです。", "私は猫が好きです。"
    assert M.rouge_l_f1(prediction, reference) > 0.75
    assert M.corpus_bleu([prediction], [reference]) > 30  # ~66 with `char`, ~41 with `ja-mecab`; 0 with 13a
    assert M.exact_match_rate([prediction], [reference]) == 0


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError):
        M.corpus_bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        M.generation_metrics([], [])
