"""Tokenizers, ROUGE-L F1 and the pruning index, against rouge_score and brute force."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, tokenizers

from pipeline import similarity
from pipeline.similarity import RougeIndex, length_window, min_overlap, min_shared_tokens, rouge_l, tokenize

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"

ENGLISH = [
    "Give three tips for staying healthy.",
    "Give 3 tips for staying healthy!",
    "Rewrite the following sentence in the passive voice: \"The cat chased the mouse.\"",
    "What's the capital of France? (Answer in one word)",
    "Generate a list of 10 words that rhyme with 'cat'.",
    "snake_case and CamelCase, e-mail: a.b@c.com -- 3.14",
    "",
    "   ",
]
MIXED = ["Café déjà-vu", "ＡＢＣ１２３ fullwidth", "İstanbul", "猫を英語に翻訳してください。", "한국어 문장", "हिन्दी भाषा"]


def lcs_length(a: list, b: list) -> int:
    """Textbook dynamic programme: the reference the C++ result is checked against."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_rouge_tokenizer_matches_rouge_score_exactly():
    reference = tokenizers.DefaultTokenizer(use_stemmer=False)
    for text in ENGLISH + MIXED:
        assert tokenize(text, "rouge") == reference.tokenize(text), text


@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=80))
def test_multilingual_equals_rouge_on_ascii(text):
    assert tokenize(text, "multilingual") == tokenize(text, "rouge")


def test_multilingual_splits_cjk_per_character_and_words_elsewhere():
    assert tokenize("猫を英語に翻訳して", "multilingual") == list("猫を英語に翻訳して")
    assert tokenize("한국어 문장", "multilingual") == ["한", "국", "어", "문", "장"]
    assert tokenize("ＡＢＣ１２３ Café déjà-vu", "multilingual") == ["abc123", "café", "déjà", "vu"]
    assert tokenize("हिन्दी भाषा", "multilingual") == ["हिन्दी", "भाषा"]  # vowel signs stay inside words
    assert tokenize("日本語のtextを3つ", "multilingual") == ["日", "本", "語", "の", "text", "を", "3", "つ"]
    assert tokenize("猫を英語に翻訳して", "rouge") == []  # why the anchors never catch Japanese duplicates
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenize("x", "whitespace")


def test_japanese_near_duplicates_are_caught_and_unrelated_ones_are_not():
    a = tokenize("次の文章を英語に翻訳してください。", "multilingual")
    b = tokenize("次の文章を英語に翻訳しなさい。", "multilingual")
    one_char = tokenize("次の文章を英語に翻訳してくだせい。", "multilingual")
    unrelated = tokenize("好きな果物を三つ挙げ、その理由を説明せよ。", "multilingual")
    assert rouge_l(a, one_char) > 0.9
    assert rouge_l(a, b) > 0.7
    assert rouge_l(a, unrelated) < 0.3


def test_rouge_l_on_literals():
    assert rouge_l("a b c".split(), "a c".split()) == pytest.approx(0.8)
    assert rouge_l(["a"], ["a"]) == 1.0
    assert rouge_l([], ["a"]) == 0.0
    assert rouge_l([], []) == 0.0
    assert rouge_l(["a", "b"], ["c"]) == 0.0


@given(st.lists(st.sampled_from("abcde"), max_size=15), st.lists(st.sampled_from("abcde"), max_size=15))
def test_rouge_l_is_two_lcs_over_total_length(a, b):
    expected = 2 * lcs_length(a, b) / (len(a) + len(b)) if a and b else 0.0
    assert rouge_l(a, b) == pytest.approx(expected, abs=1e-12)


def real_instructions(limit: int) -> list[str]:
    if ALPACA.exists():
        return [r["instruction"] for r in json.loads(ALPACA.read_text(encoding="utf-8"))[:limit]]
    return ENGLISH[:6]


def test_rouge_l_equals_rouge_score_bit_for_bit_on_real_strings():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = real_instructions(60) + ENGLISH
    for i, a in enumerate(texts):
        for b in texts[i:i + 8]:
            expected = scorer.score(a, b)["rougeL"].fmeasure
            assert rouge_l(tokenize(a, "rouge"), tokenize(b, "rouge")) == expected, (a, b)


def test_ties_at_the_threshold_fall_as_in_rouge_score():
    # LCS 7 of lengths 8 and 12: 2*7/20 is 0.7 exactly on paper; only the float formula decides.
    a = "a b c d e f g h".split()
    b = "a b c d e f g x y z w v".split()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = scorer.score(" ".join(a), " ".join(b))["rougeL"].fmeasure
    assert rouge_l(a, b) == expected
    assert (rouge_l(a, b) > 0.7) == (expected > 0.7)


def test_bounds_never_prune_a_pair_above_the_threshold():
    for t in (0.0, 0.3, 0.5, 0.7, 0.9, 1.0):
        for m in range(1, 40):
            for n in range(1, 40):
                for overlap in range(0, min(m, n) + 1):
                    if 2 * overlap / (m + n) > t:  # the best LCS this overlap allows scores above t
                        low, high = length_window(m, t)
                        assert low < n < high
                        assert overlap >= max(min_shared_tokens(m, t), min_shared_tokens(n, t))
                        assert overlap >= min_overlap(m + n, t)
                        # the shorter member's short prefix is enough (RougeIndex._ensure_tables)
                        assert overlap >= min_overlap(2 * min(m, n), t)


def brute_best(pool: list[tuple[str, str]], text: str, tokenizer: str) -> tuple[float, str | None]:
    tokens = tokenize(text, tokenizer)
    best, best_id = 0.0, None
    for item_id, other in pool:
        score = rouge_l(tokens, tokenize(other, tokenizer))
        if score > best:
            best, best_id = score, item_id
    return best, best_id


def naive_greedy(seeds, items, threshold, tokenizer):
    pool = list(seeds)
    out = []
    for item_id, text in items:
        best, best_id = brute_best(pool, text, tokenizer)
        keep = best <= threshold
        out.append((keep, best if not keep else None, best_id if not keep else None))
        if keep:
            pool.append((item_id, text))
    return out


sentences = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"]), max_size=10).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(seeds=st.lists(sentences, max_size=4), texts=st.lists(sentences, min_size=1, max_size=30),
       threshold=st.sampled_from([0.0, 0.4, 0.5, 0.7, 0.8, 1.0]), block_size=st.sampled_from([1, 2, 5, 64]),
       hint=st.booleans())
def test_blockwise_pruned_greedy_equals_naive_sequential(seeds, texts, threshold, block_size, hint):
    seeds = [(f"s{i}", t) for i, t in enumerate(seeds)]
    items = [(f"m{i}", t) for i, t in enumerate(texts)]
    index = RougeIndex(threshold, "rouge", block_size=block_size)
    if hint:
        index.prepare_order([t for _, t in seeds + items])
    for item_id, text in seeds:
        index.add(item_id, text)
    got = index.add_unless_similar(items)
    expected = naive_greedy(seeds, items, threshold, "rouge")
    # Rejections carry the exact score and its source; kept items' scores are only lower bounds.
    assert [(k, s if not k else None, i if not k else None) for k, s, i in got] == expected
    assert len(index) == len(seeds) + sum(k for k, _, _ in got)
    assert index.pairs_compared <= index.pairs_possible
    for keep, score, best_id in got:
        if keep and best_id is not None:
            assert score <= threshold


@settings(max_examples=100, deadline=None)
@given(pool=st.lists(sentences, max_size=20), queries=st.lists(sentences, min_size=1, max_size=5),
       threshold=st.sampled_from([0.3, 0.7]))
def test_best_matches_exact_above_threshold_and_honest_below(pool, queries, threshold):
    pool = [(f"p{i}", t) for i, t in enumerate(pool)]
    index = RougeIndex(threshold, "rouge")
    for item_id, text in pool:
        index.add(item_id, text)
    for query, (score, best_id) in zip(queries, index.best_matches(queries)):
        true_best, _ = brute_best(pool, query, "rouge")
        if true_best > threshold:
            assert score == true_best
        else:
            assert score <= true_best
        if best_id is not None:  # the reported id's score is its real score
            assert score == rouge_l(tokenize(query, "rouge"), tokenize(index.text_of(best_id), "rouge"))
        else:
            assert score == 0.0


def test_index_basics_and_exact_scores_of_earlier_members():
    index = RougeIndex(0.7)
    assert len(index) == 0
    assert index.best_matches(["anything at all"]) == [(0.0, None)]
    texts = ["write a poem about the sea", "write a poem about the sky", "list three prime numbers",
             "explain how a bicycle works", "write a short poem about the sea"]
    for i, text in enumerate(texts):
        index.add(f"t{i}", text)
    assert len(index) == 5 and index.text_of("t3") == texts[3] and "t4" in index
    with pytest.raises(ValueError, match="duplicate id"):
        index.add("t0", "again")
    exact = index.exact_best_earlier(list(range(5)))
    expected = [(0.0, None)] + [brute_best([(f"t{j}", texts[j]) for j in range(p)], texts[p], "multilingual")
                                for p in range(1, 5)]
    assert exact == expected
    score, best_id = index.best_matches(["write a poem about the sea"])[0]
    assert (score, best_id) == (1.0, "t0")


def test_japanese_duplicates_in_the_index():
    index = RougeIndex(0.7, "multilingual")
    index.add("seed", "次の文章を英語に翻訳してください。")
    results = index.add_unless_similar([("a", "次の文章を英語に翻訳してくだせい。"), ("b", "好きな果物を三つ挙げてください。")])
    assert [r[0] for r in results] == [False, True]
    assert results[0][2] == "seed"
    rouge_only = RougeIndex(0.7, "rouge")
    rouge_only.add("seed", "次の文章を英語に翻訳してください。")
    assert rouge_only.add_unless_similar([("a", "次の文章を英語に翻訳してください。")])[0][0] is True


words = st.lists(st.sampled_from([f"w{i}" for i in range(30)]), min_size=1, max_size=12).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(words, min_size=1, max_size=40), threshold=st.sampled_from([0.5, 0.7]),
       block_size=st.sampled_from([1, 3, 16]), packed=st.booleans())
def test_greedy_equals_naive_with_new_tokens_after_reorders_and_without_packing(texts, threshold, block_size, packed):
    # No order hint: the pool re-counts its order as it doubles, and tokens first seen after a
    # re-count must still sort consistently. `packed=False` forces the general match path
    # (taken for sequences over 4,096 tokens) by leaving no bits to pack into.
    items = [(f"m{i}", t) for i, t in enumerate(texts)]
    index = RougeIndex(threshold, "rouge", block_size=block_size)
    with mock.patch.object(similarity, "_PACK_BITS", similarity._PACK_BITS if packed else 0):
        got = index.add_unless_similar(items)
    expected = naive_greedy([], items, threshold, "rouge")
    assert [(k, s if not k else None, i if not k else None) for k, s, i in got] == expected


@given(st.lists(st.integers(0, 40), max_size=60), st.lists(st.integers(0, 40), max_size=60))
def test_sketch_bound_is_never_below_the_bag_overlap(a, b):
    index = RougeIndex(0.7, "rouge")
    seqs = [index.encode(" ".join(f"t{x}" for x in a)), index.encode(" ".join(f"t{x}" for x in b))]
    elements = similarity._Elements(seqs, index._rank, index._prefix_sizes)
    sketches = elements.sketches().astype(int)
    bound = sum(min(x, y) for x, y in zip(sketches[0], sketches[1]))
    assert bound >= sum((Counter(a) & Counter(b)).values())


def test_long_sequences_take_the_general_paths():
    # Over 255 tokens the sketch saturates and is skipped; over 4,096 matches are not packed.
    rng = __import__("random").Random(5)
    long_text = " ".join(f"x{rng.randrange(3000)}" for _ in range(5000))
    edited = long_text.split()
    edited[100] = "changed"
    medium = " ".join(f"y{rng.randrange(50)}" for _ in range(300))
    index = RougeIndex(0.7, "rouge", block_size=4)
    results = index.add_unless_similar([("long", long_text), ("medium", medium), ("edit", " ".join(edited)),
                                        ("medium2", medium + " extra"), ("short", "a short one")])
    assert [keep for keep, _, _ in results] == [True, True, False, False, True]
    assert results[2][1:] == (rouge_l(edited, long_text.split()), "long")
    assert results[3][2] == "medium"


@settings(max_examples=80, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from("abc"), max_size=7).map(" ".join), min_size=1, max_size=25),
       chunk=st.sampled_from([1, 4, 256]))
def test_exact_best_earlier_is_the_first_highest_even_among_ties(texts, chunk):
    # A three-letter alphabet makes many exact ties and empty texts; the earliest highest wins.
    index = RougeIndex(0.7, "rouge")
    for i, text in enumerate(texts):
        index.add(f"t{i}", text)
    positions = list(range(len(texts)))[::-1]
    got = index.exact_best_earlier(positions, chunk=chunk)
    for p, result in zip(positions, got):
        assert result == brute_best([(f"t{j}", texts[j]) for j in range(p)], texts[p], "rouge")
