"""The eval measures on fixed cases: hand-computed loss and accuracy, sequence accuracy (strict)
and exact match (normalised), and BLEU / chrF / ROUGE-1/2/L against sacrebleu, rouge_score and
hand computation, with one reference or several."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU
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


def test_strict_match_strips_the_ends_only():
    assert M.same_text("  Paris\n", "Paris")
    assert M.same_text(" 私は猫が好きです。\n", "私は猫が好きです。")
    # A whitespace-only difference inside counts against the strict match, for the normalised one.
    assert not M.same_text("a  b\n\t c", "a b c") and M.exact_match("a  b\n\t c", "a b c")
    assert not M.same_text("3600 円", "3600円") and M.exact_match("3600 円", "3600円")
    assert not M.same_text("Paris.", "Paris")
    assert not M.same_text("paris", "Paris")
    assert not M.same_text("肯定。", "肯定")
    assert not M.same_text("３６００円", "3600円")
    assert M.match_rate(["  Paris\n", "a  b", "Rome"], ["Paris", "a b", "Roma"], M.same_text) == pytest.approx(1 / 3)
    assert M.match_rate(["  Paris\n", "a  b", "Rome"], ["Paris", "a b", "Roma"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("prediction, reference", [
    ("肯定。", "肯定"),
    ("３６００円", "3600円"),
    ("3600 円", "3600円"),  # Japanese puts no space between words
    ("はい！", "はい"),
    ("以上です．", "以上です"),
    ("ＡＢＣ", "ABC"),
    ("Paris.", "Paris"),
])
def test_normalized_exact_match_ignores_width_spaces_and_final_marks(prediction, reference):
    assert M.exact_match(prediction, reference)
    assert not M.same_text(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("否定", "肯定"),
    ("3,600円", "3600円"),  # a different string of digits, not a different width
    ("paris", "Paris"),  # case is part of the answer
    ("肯定。です", "肯定です"),  # only a trailing mark is dropped
    ("New York", "NewYork"),  # spaces between Latin words still count
    ("안녕 하세요", "안녕하세요"),  # and so do Korean ones
])
def test_normalized_exact_match_still_tells_different_answers_apart(prediction, reference):
    assert not M.exact_match(prediction, reference)


def test_strict_and_normalised_rates_are_reported_side_by_side():
    preds = ["肯定。", "３６００円", "否定", "Paris"]
    refs = ["肯定", "3600円", "肯定", "Paris"]
    result = M.generation_metrics(preds, refs)
    assert result["sequence_accuracy"] == pytest.approx(1 / 4)
    assert result["exact_match"] == pytest.approx(3 / 4)
    # Token-level hits from the model replace the text comparison when given.
    assert M.generation_metrics(preds, refs, sequence_hits=[True, True, False, False])["sequence_accuracy"] == 0.5


def test_bleu_equals_sacrebleu_on_english():
    expected = sacrebleu.corpus_bleu(ENGLISH_PREDS, [ENGLISH_REFS]).score
    assert 0 < expected < 100
    assert M.corpus_bleu(ENGLISH_PREDS, ENGLISH_REFS) == pytest.approx(expected)


def test_japanese_bleu_is_always_ja_mecab_and_equals_sacrebleu():
    assert M.bleu_tokenize_for("ja") == "ja-mecab"
    assert M.bleu_tokenizer_signature("ja").startswith("ja-mecab-")  # MeCab's version and IPA dictionary
    expected = sacrebleu.corpus_bleu(JAPANESE_PREDS, [JAPANESE_REFS], tokenize="ja-mecab").score
    assert 0 < expected < 100
    assert M.corpus_bleu(JAPANESE_PREDS, JAPANESE_REFS) == pytest.approx(expected)
    assert expected != pytest.approx(sacrebleu.corpus_bleu(JAPANESE_PREDS, [JAPANESE_REFS], tokenize="char").score)


def test_ja_mecab_scores_word_ngrams_computed_by_hand():
    # MeCab splits both into 私/は/{犬,猫}/が/好き/です/。 (7 words; `char` would see 9 characters):
    # 6/7 unigrams, 4/6 bigrams, 2/5 trigrams and 1/4 four-grams match, equal lengths (BP 1).
    by_hand = 100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert M.corpus_bleu(["私は犬が好きです。"], ["私は猫が好きです。"]) == pytest.approx(by_hand)


def pooled_bleu(stats) -> float:
    """Corpus BLEU from n-gram counts and lengths summed over several sacrebleu results, by the
    formula itself (Papineni et al. 2002): BP x geometric mean of the four pooled precisions."""
    correct = [sum(s.counts[n] for s in stats) for n in range(4)]
    total = [sum(s.totals[n] for s in stats) for n in range(4)]
    sys_len, ref_len = sum(s.sys_len for s in stats), sum(s.ref_len for s in stats)
    brevity = 1.0 if sys_len > ref_len else math.exp(1 - ref_len / sys_len)
    return 100 * brevity * math.exp(sum(math.log(c / t) for c, t in zip(correct, total)) / 4)


def test_mixed_set_bleu_pools_ngram_counts_over_languages_not_a_mean_of_scores():
    preds, refs = ENGLISH_PREDS + JAPANESE_PREDS, ENGLISH_REFS + JAPANESE_REFS
    english = BLEU(tokenize="13a").corpus_score(ENGLISH_PREDS, [ENGLISH_REFS])
    japanese = BLEU(tokenize="ja-mecab").corpus_score(JAPANESE_PREDS, [JAPANESE_REFS])
    result = M.generation_metrics(preds, refs)
    languages = ["en"] * 5 + ["ja"] * 4
    assert M.slice_metrics(range(5), preds, refs, languages)["bleu"] == pytest.approx(english.score)
    assert M.slice_metrics(range(5, 9), preds, refs, languages)["bleu"] == pytest.approx(japanese.score)
    expected = pooled_bleu([english, japanese])
    # The two aggregations differ by ~1.8 BLEU on this set, so a plain mean cannot pass.
    assert abs(expected - (english.score + japanese.score) / 2) > 1
    assert result["bleu"] == pytest.approx(expected, abs=1e-9)
    assert M.generation_metrics(refs, refs)["bleu"] == pytest.approx(100)
    rouge = {f"rouge_{n}{part}" for n in ("1", "2", "l") for part in ("", "_precision", "_recall")}
    assert set(result) == {"sequence_accuracy", "exact_match", "bleu", "chrf"} | rouge


def test_chrf_is_sacrebleus_on_every_language_and_on_the_mix():
    preds, refs = ENGLISH_PREDS + JAPANESE_PREDS, ENGLISH_REFS + JAPANESE_REFS
    result = M.generation_metrics(preds, refs)
    languages = ["en"] * 5 + ["ja"] * 4
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert M.slice_metrics(range(5), preds, refs, languages)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(ENGLISH_PREDS, [ENGLISH_REFS]).score)
    assert M.slice_metrics(range(5, 9), preds, refs, languages)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(JAPANESE_PREDS, [JAPANESE_REFS]).score)
    # Character n-grams: a one-kanji change in a Japanese sentence leaves most of the score.
    assert 40 < M.corpus_chrf(["私は犬が好きです。"], ["私は猫が好きです。"]) < 100


def test_rouge_l_is_reported_per_language_and_overall_over_pairs():
    preds, refs = ENGLISH_PREDS + JAPANESE_PREDS, ENGLISH_REFS + JAPANESE_REFS
    result = M.generation_metrics(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    english = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(ENGLISH_PREDS, ENGLISH_REFS)]
    # Japanese by hand, one token per character, punctuation dropped: 2 x LCS / (m + n) per pair
    # (私は[犬/猫]が好きです: 7 of 8; 日本の首都 + です: 7 of 10; ...).
    japanese = [2 * 7 / (8 + 8), 2 * 7 / (10 + 10), 2 * 9 / (9 + 13), 2 * 11 / (11 + 14)]
    languages = ["en"] * 5 + ["ja"] * 4
    rouge_l_en = M.slice_metrics(range(5), preds, refs, languages)["rouge_l"]
    rouge_l_ja = M.slice_metrics(range(5, 9), preds, refs, languages)["rouge_l"]
    assert rouge_l_en == pytest.approx(sum(english) / 5)
    assert rouge_l_ja == pytest.approx(sum(japanese) / 4)
    # Overall is the mean over all nine pairs, not the mean of the two language means.
    assert result["rouge_l"] == pytest.approx((sum(english) + sum(japanese)) / 9)
    assert result["rouge_l"] != pytest.approx((rouge_l_en + rouge_l_ja) / 2)


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
    assert M.corpus_bleu([prediction], [reference]) > 30  # 48.9 with `ja-mecab`; 0 with 13a
    assert M.match_rate([prediction], [reference]) == 0


def test_rouge_1_and_2_equal_rouge_score_on_english():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    pairs = list(zip(ENGLISH_PREDS, ENGLISH_REFS)) + [("", "something"), ("Hello, World!", "hello world")]
    for prediction, reference in pairs:
        expected = scorer.score(reference, prediction)
        for ours, theirs in ((M.rouge_n(prediction, reference, 1), "rouge1"), (M.rouge_n(prediction, reference, 2), "rouge2"),
                             (M.rouge_l(prediction, reference), "rougeL")):
            assert ours.f1 == pytest.approx(expected[theirs].fmeasure), (prediction, theirs)
            assert ours.precision == pytest.approx(expected[theirs].precision), (prediction, theirs)
            assert ours.recall == pytest.approx(expected[theirs].recall), (prediction, theirs)
    result = M.generation_metrics(ENGLISH_PREDS, ENGLISH_REFS)
    scores = [scorer.score(r, p) for p, r in zip(ENGLISH_PREDS, ENGLISH_REFS)]
    assert result["rouge_2_recall"] == pytest.approx(sum(s["rouge2"].recall for s in scores) / 5)


def test_every_text_measure_on_a_japanese_pair_by_hand():
    prediction, reference = "私は犬が好きです。", "私は猫が好きです。"
    # Characters 私/は/犬/が/好/き/で/す (punctuation dropped): 7 of 8 shared; 5 of 7 bigrams
    # (私は, が好, 好き, きで, です; は犬 and 犬が are new).
    assert M.rouge_n(prediction, reference, 1) == M.PRF(7 / 8, 7 / 8, pytest.approx(7 / 8))
    assert M.rouge_n(prediction, reference, 2) == M.PRF(5 / 7, 5 / 7, pytest.approx(5 / 7))
    assert M.rouge_l(prediction, reference) == M.PRF(7 / 8, 7 / 8, pytest.approx(7 / 8))
    # A shorter answer: precision of its own tokens stays high, recall of the reference drops.
    short = M.rouge_l("猫が好き", reference)
    assert (short.precision, short.recall) == (1.0, pytest.approx(4 / 8))
    result = M.generation_metrics([prediction, "私は猫が好きです", " 私は猫が好きです。 "], [reference] * 3)
    assert result["sequence_accuracy"] == pytest.approx(1 / 3)  # only the one with stripped ends
    assert result["exact_match"] == pytest.approx(2 / 3)  # a missing 。 is the same answer
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(
        [prediction, "私は猫が好きです", "私は猫が好きです。"], [[reference] * 3], tokenize="ja-mecab").score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf([prediction, "私は猫が好きです", " 私は猫が好きです。 "],
                                                                 [[reference] * 3]).score)


def test_several_references_take_the_best_one():
    preds = ["A cat sat on the mat.", "東京です。", "Blue."]
    refs = [["The cat sat on the mat.", "A cat sat on the mat."], ["首都は東京です。"], ["Red.", "Green.", "Blue"]]
    result = M.generation_metrics(preds, refs)
    assert result["sequence_accuracy"] == pytest.approx(1 / 3)  # the first equals its second reference
    assert result["exact_match"] == pytest.approx(2 / 3)  # and "Blue." is "Blue" once normalised
    assert M.best_rouge(M.rouge_l, preds[0], refs[0]).f1 == 1.0
    assert result["rouge_1"] == pytest.approx((1.0 + M.rouge_n(preds[1], refs[1][0], 1).f1 + 1.0) / 3)
    # BLEU and chrF: sacrebleu's multi-reference scoring, a missing reference given as None.
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs], [r[2] if len(r) > 2 else None for r in refs]]
    languages = ["en", "en", "en"]  # one tokenizer so sacrebleu's own call is the same computation
    assert M.corpus_bleu(preds, refs, languages) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)


def test_a_slice_reports_only_what_applies_to_it():
    preds, refs, languages = ["肯定", "Yes.", "A long answer"], ["肯定。", "No", "A long answer"], ["ja", "en", "en"]
    assert M.slice_metrics([0, 1], preds, refs, languages, classification=True) == {"label_accuracy": 0.5}
    text = M.slice_metrics([2], preds, refs, languages)
    assert "label_accuracy" not in text and text["exact_match"] == 1.0
    assert M.slice_metrics([], preds, refs, languages) == {}  # nothing to score: absent, never 0


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        M.corpus_bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no references"):
        M.generation_metrics([], [])
