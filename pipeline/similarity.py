"""ROUGE-L similarity for near-duplicate search: tokenizers, exact ROUGE-L F1, and a pruning index.

Used by `python -m pipeline filter` (the near-duplicate filter), by `generate` online (add what
was kept, query a batch), by `mix` (dedup across sources) and by `eval` (the tokenizer).

- `tokenize(text, "rouge")` gives exactly rouge_score's default tokens (lowercase, every run of
  `[^a-z0-9]` is a separator, no stemming). `tokenize(text, "multilingual")` (the default of
  filter, generate and mix) gives the same tokens on ASCII text, so English decisions are
  rouge_score's. On other text it applies NFKC and lowercase; Japanese (text with kana) is
  scored on the task without its request frame, as readings in character bigrams
  (`pipeline.ja_tokens`: precision 0.957 and recall 0.938 on 96 labelled Japanese pairs at 0.7,
  where one token per character had 0.613 and 0.958); other text makes each kanji and hangul
  character one token (those scripts have no spaces) and splits everything else into runs of
  letters, digits and combining marks. `tokenize(text, "characters")` is that last rule for
  every non-ASCII text, Japanese included: for scoring answers (eval), where the frame is content.
  The index sees only tokens, so every guarantee below holds for each tokenizer.
- `rouge_l(a, b)` is ROUGE-L F1 with beta 1, 2*LCS/(m+n), computed from rapidfuzz's LCS with
  rouge_score's own float formula (2pr/(p+r)), so it equals rouge_score's `rougeL` fmeasure bit
  for bit: a tie exactly at the threshold is decided the same way as the reference.
- `RougeIndex`: a pool of token sequences with an inverted index. Each token becomes one
  integer id, stored as one character of a Python string, so rapidfuzz's C++ LCS
  (`process.cpdist` with `Indel.distance`; all cores for big blocks) compares whole blocks of
  pairs in one call.

Pruning never changes a decision. A pair (a, b) of lengths m, n can only score above t if
2*min(m,n)/(m+n) > t (length bound) and they share at least min_overlap(m+n) =
floor(t*(m+n)/2) + 1 tokens counted with multiplicity (an LCS is a common sub-multiset). Each
sequence's tokens (the k-th copy of a token being its own element) are sorted by one global
order, rarest first (counted by `prepare_order`, or re-counted as the pool doubles; tokens
unseen at the last count sort first). Then, per block of candidates, all in numpy:

1. Prefix filter (AllPairs / PPJoin): two sequences that can score above t share an element
   in their prefixes. The long prefix, m - alpha(m) + 1 with alpha(m) = floor(t*m/(2-t)) + 1,
   is enough against any partner; against a partner at least as long, the short prefix
   m - min_overlap(2m) + 1 is. Both are indexed, as postings sorted by (element, length), and a
   block probes the longer member's long prefix against the shorter one's short prefix, each
   length window being one searchsorted range (length filter). Against a partner of length n
   only the first m - min_overlap(m+n) + 1 elements of either side are needed, so a query's
   element at position i searches only partners with min_overlap(m+n) <= m - i (a narrower
   window), and an item's stored element at position j is dropped from a match unless
   j <= n - min_overlap(m+n). Per pair the matches are then all shared elements of two
   prefixes (one per side), which is what step 3 relies on.
2. Bitmap bound, per match: per sequence, which of 64 hash buckets hold at least one token
   and at least two (two uint64 words, stored beside each posting so a match reads them in
   order). popcount(ones & ones') + popcount(twos & twos') plus the query's tokens beyond two
   per bucket bounds the bag overlap from above. It depends on the pair alone, so a pair
   loses all its matches or none; it removes ~99% of matches before they are grouped.
3. Positional filter (PPJoin): the shared prefix elements of a pair are all its shared elements
   up to the last of them, which sits at i and j, so overlap <= their count + min(m-1-i, n-1-j).
   Matches are grouped into pairs by one sort, item first, so what follows reads the pool's
   arrays in order.
4. Bag bound: per sequence, token counts in 32 hash buckets; the sum of bucket-wise minima
   bounds the overlap from above (coarser buckets than step 2's, but full counts where step 2
   keeps two levels: on the synthetic million it still removes a quarter of what is left).
5. The rest get the exact LCS in one rapidfuzz call per block; then the block settles in order
   (an earlier item of the block counts only once it is kept), as the sequential greedy does.

`exact_best_earlier` (the exact highest score of every kept record, for the filter's report)
has no threshold to prune with: a kept record's best is usually near 0.4, where the bounds above
keep most pairs. So it bounds every earlier pair in rapidfuzz's SIMD `cdist` (~5 ns a pair)
over an alphabet of 255 characters, where frequent tokens keep their own and rare ones share
(an LCS can only grow when tokens merge), and scores exactly only the pairs whose bound reaches
the exact score of their row's best-bounded pair: ~3 a row on Alpaca, not ~1,000.

The work grows with the pairs that share a rare-enough token, not with the pool squared; on
text whose every word is common it still grows about quadratically (see bench/bench_filter.py).
"""

from __future__ import annotations

import gc
import math
import os
import re
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import repeat
from typing import Callable, Literal

import numpy as np

from pipeline.ja_tokens import has_kana, japanese_tokens

Tokenizer = Literal["rouge", "multilingual", "characters"]
# `characters` is `multilingual` without the Japanese frame rule: one token per CJK character,
# for scoring an answer against a reference (eval's ROUGE-L), where the frame is content.
TOKENIZERS: tuple[str, ...] = ("rouge", "multilingual", "characters")

# Self-Instruct's near-duplicate rule (sec. 2.3): a candidate whose ROUGE-L F1 against the pool is
# above this is dropped. generate, filter and mix all default to it and take the same bounds: an
# F1 lies in [0, 1]; 1 drops only exact token copies, and 0 is refused, since it would drop every
# candidate that shares a single token (a "the") with the pool.
NEAR_DUPLICATE_THRESHOLD = 0.7
THRESHOLD_BOUNDS = {"above": 0.0, "max": 1.0}

# rouge_score's tokenizer: lowercase, every run of anything but [a-z0-9] separates tokens.
NON_ALNUM_RE = re.compile(r"[^a-z0-9]+")
# The same rule over many texts joined by a separator that it leaves alone (`_token_stream`).
_BATCH_SEPARATOR = "\x00"
_SEPARATED = f" {_BATCH_SEPARATOR} "  # a token of its own after `split()`
# Where one text's ids end in the string of a batch's ids: a surrogate, which no id uses.
_ID_SEPARATOR = "\ud800"
# That rule as one byte table for ASCII text: A-Z lowercased, a-z, 0-9 and the separator kept,
# every other byte a space (then `split()` merges the runs). bytes.translate does in one C pass
# what lower() plus a regex substitution did in two (the regex was ~15% of a 2,000-record filter).
_ASCII_TOKEN_BYTES = bytes(
    b + 32 if 65 <= b <= 90 else b if 97 <= b <= 122 or 48 <= b <= 57 or b == 0 else 32 for b in range(256))

# Scripts written without spaces: one token per character, so a one-character edit to a
# Japanese sentence changes one token, exactly like a one-word edit to an English one.
_NO_SPACE_SCRIPTS = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]"
_MULTILINGUAL_PATTERN = _NO_SPACE_SCRIPTS + r"|[[\p{L}\p{N}\p{M}]--" + _NO_SPACE_SCRIPTS + "]+"
_multilingual_re = None

# Token ids are stored as characters so rapidfuzz reads a sequence as a flat buffer (about six
# times faster than a list of ints); ids skip the surrogate block, which no str may hold alone.
_SURROGATES_START, _SURROGATES_SIZE = 0xD800, 0x800
MAX_VOCAB = 0x110000 - _SURROGATES_SIZE
# Element key of the k-th copy of token `i` in one sequence: i + k * _COPY_STRIDE.
_COPY_STRIDE = 0x110000
_TOKEN_BITS = 21  # a token id fits in 21 bits (MAX_VOCAB < 2**21)

# Pruning bounds are loosened by this much so a pair whose float score lands a rounding error
# above the threshold is still verified exactly; the decision itself uses the exact score.
_BOUND_SLACK = 1e-9
# The global token order (rarest first) is re-counted when the pool has grown by this factor
# since the last count; between counts, unseen tokens count as rarest. Rebuilding costs one
# pass over the pool, so doubling keeps it O(total tokens) overall.
REORDER_GROWTH = 2.0
# Candidates per block: one cpdist call per block amortises the call overhead over thousands
# of pairs, and a small block keeps the in-block comparisons (against not-yet-settled
# candidates) a small share of the work.
DEFAULT_BLOCK_SIZE = 1024
# Postings keys are element << _LEN_BITS | length; lengths above the cap share the last slot
# and are checked exactly afterwards. 20 bits leave 43 for the element (token id + copy).
_LEN_BITS = 20
_LEN_CAP = (1 << _LEN_BITS) - 1
_BIG_LENGTH = 1 << 40  # "no upper length bound" (threshold 0)
# Arrays grown by doubling start this big (tokens, pool members).
_INITIAL_CAPACITY = 1024
# A new postings run is merged into the one before it once it is at least this share of its
# size: runs then shrink geometrically, about log2(pool/block) of them, each probed per block.
_RUN_MERGE_RATIO = 2
# Re-indexing after a re-count goes this many members at a time to bound temporary memory.
_REINDEX_CHUNK = 65_536
_PACK_BITS = 63  # a sort key packed into one non-negative int64
# Bits for a token's position in a packed match: sequences up to 4,096 tokens (longer ones
# make the index fall back to separate arrays).
_POS_BITS = 12
_POS_MASK = (1 << _POS_BITS) - 1
# Bag sketch: per sequence, how many of its tokens fall in each of this many hash buckets. The
# sum over buckets of the smaller count bounds the bag overlap from above (collisions only
# loosen it), in _SKETCH_BUCKETS bytes per pool member (counts saturate at 255, so pairs with a
# sequence longer than that skip this bound); 32 buckets for ~10-40 tokens keeps
# collisions few, and a vectorised min-sum over 32 columns costs far less than an LCS call.
_SKETCH_BUCKETS = 32
_SKETCH_SHIFT = 32 - 5  # top 5 of 32 bits of a multiplicative hash: 32 buckets
_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (2^32 / golden ratio)
_SKETCH_MAX = 255
_BYTE_SUM_MULTIPLIER = 0x0101010101010101  # x * this has the sum of x's eight bytes in its top byte
_TOP_BYTE_SHIFT = 56
# Bucket bitmaps (`_Elements.bitmaps`): one uint64 word per level, so 64 buckets; the top 6
# bits of the same multiplicative hash pick one.
_BITMAP_BUCKETS = 64
_BITMAP_SHIFT = 32 - 6
_UINT8_MAX = 255
_SKETCH_CHUNK = 1 << 20  # pairs per vectorised bound evaluation, to bound temporary memory
# rapidfuzz starts its worker threads on every call: ~1 ms on an idle machine and ~10 ms on a
# loaded one, against ~0.3 us a pair on one thread, so a block with fewer pairs stays on one.
_PARALLEL_PAIRS = 20_000
# The exact-score pass bounds every pair over characters 1..255 (`_SmallAlphabet`):
# rapidfuzz looks those up in a flat table, others in a hash map (half the speed). The most
# frequent tokens keep their own character; 64 left 3,549 pairs on 2,000 Alpaca instructions
# with a bound at or above the row's best, against 6,993 for 224 (fewer shared ones collide more).
_SMALL_ALPHABET = 255
_DISTINCT_CODES = 64
# A bound is a float32 (rounded by at most 6e-8 below 1): pairs within this of a row's floor
# are scored exactly too, so rounding never hides a pair that ties or beats it.
_BOUND_MARGIN = 1e-6
# Rounds of scoring each row's highest bounds before the rest is scored at once (`_score_by_bound`).
_BOUND_ROUNDS = 3
_EXAMPLE_CHARS = 40  # a text quoted in a warning is cut to this many characters


def _sketch_overlap(first: np.ndarray, second: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair, the sum over buckets of min(first[a], second[b]): exact when either sequence has at
    most _SKETCH_MAX tokens (other pairs skip the bound, whatever this gives).

    A sketch row is 32 bytes, read as four uint64 words: the bytewise minimum is numpy's on a
    uint8 view, the four words are added as integers (no byte carries, since the minima sum
    to at most the shorter length, at most 255), and a multiply by 0x0101...01 sums a word's
    eight bytes into its top byte. This replaced a 32-column int64 reduction that cost ~200 ns
    a pair, the largest share of the filter at a million records.
    """
    words = np.minimum(first.view(np.uint64)[a].view(np.uint8),
                       second.view(np.uint64)[b].view(np.uint8)).view(np.uint64)
    total = words[:, 0] + words[:, 1] + words[:, 2] + words[:, 3]
    return ((total * _BYTE_SUM_MULTIPLIER) >> _TOP_BYTE_SHIFT).view(np.int64)


def _multilingual() -> "object":
    global _multilingual_re
    if _multilingual_re is None:
        import regex  # the stdlib `re` has no Unicode script or mark classes

        _multilingual_re = regex.compile(_MULTILINGUAL_PATTERN, regex.V1)
    return _multilingual_re


def tokenize(text: str, tokenizer: str = "multilingual") -> list[str]:
    """Tokens for ROUGE-L: `rouge` (rouge_score's default), `multilingual` or `characters` (module doc)."""
    if tokenizer == "rouge" or (tokenizer in ("multilingual", "characters") and text.isascii()):
        return NON_ALNUM_RE.sub(" ", text.lower()).split()
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
    text = unicodedata.normalize("NFKC", text).lower()
    if tokenizer == "multilingual" and has_kana(text):
        return japanese_tokens(text, _multilingual().findall)
    return _multilingual().findall(text)


def _token_stream(texts: list[str], tokenizer: str) -> list[str]:
    """`tokenize(text, tokenizer)` of each text in one list, each text's tokens followed by
    `_BATCH_SEPARATOR` (never a token itself). Runs of ASCII texts (where every tokenizer is
    rouge_score's: lowercase, runs of [^a-z0-9] separate) go through one byte-table pass and one
    `split` over their concatenation, the separator standing alone between them: on a million
    texts that is several times faster than a regex call per text."""
    stream: list[str] = []
    run: list[str] = []  # ASCII texts waiting for one pass

    def flush_run() -> None:
        if run:
            joined = _SEPARATED.join(run) + _SEPARATED
            stream.extend(joined.encode("ascii").translate(_ASCII_TOKEN_BYTES).decode("ascii").split())
            run.clear()

    for text in texts:
        if tokenizer in TOKENIZERS and text.isascii() and _BATCH_SEPARATOR not in text:
            run.append(text)
            continue
        flush_run()
        stream.extend(tokenize(text, tokenizer))
        stream.append(_BATCH_SEPARATOR)
    flush_run()
    return stream


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for a block that allocates millions of small lists
    and strings but makes no cycles: each collection it would trigger walks every live
    container, which was more than half of tokenizing a million texts."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _f1_from_lcs(lcs, m, n):
    """rouge_score's fmeasure: p = lcs/n, r = lcs/m, 2pr/(p+r); works on ints or numpy arrays.

    Computed in the same float operations as rouge_score, so scores equal its output exactly
    (2*LCS/(m+n) up to the last bit) and a tie at the threshold falls the same way.
    """
    if isinstance(lcs, np.ndarray):
        lcs = lcs.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p, r = lcs / n, lcs / m
            f = 2 * p * r / (p + r)
        return np.where(lcs > 0, f, 0.0)
    if lcs == 0:
        return 0.0
    p, r = lcs / n, lcs / m
    return 2 * p * r / (p + r)


def rouge_l(a_tokens: list[str], b_tokens: list[str]) -> float:
    """ROUGE-L F1 (beta 1) = 2*LCS/(m+n), equal to rouge_score's rougeL fmeasure; 0.0 if either is empty."""
    from rapidfuzz.distance import Indel

    if not a_tokens or not b_tokens:
        return 0.0
    m, n = len(a_tokens), len(b_tokens)
    lcs = (m + n - Indel.distance(a_tokens, b_tokens)) // 2
    return _f1_from_lcs(lcs, m, n)


def rouge_l_texts(a: str, b: str, tokenizer: str = "multilingual") -> float:
    """ROUGE-L F1 of two texts: `rouge_l` of their `tokenize(..., tokenizer)` tokens."""
    return rouge_l(tokenize(a, tokenizer), tokenize(b, tokenizer))


def max_rouge_l(texts: list[str], references: list[str], tokenizer: str = "multilingual") -> list[float]:
    """Per text, its exact highest ROUGE-L F1 against any of `references` (0.0 when there are none).

    Every pair is compared, unpruned (rapidfuzz's C++ on all cores), with `rouge_l`'s formula:
    for a report on a few thousand texts (`inspect`), not for the filter (use `RougeIndex`).
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    vocabulary: dict[str, int] = {}

    def ids(text: str) -> list[int]:
        return [vocabulary.setdefault(token, len(vocabulary)) for token in tokenize(text, tokenizer)]

    rows, columns = [ids(text) for text in texts], [ids(text) for text in references]
    if not rows or not columns:
        return [0.0] * len(texts)
    distances = process.cdist(rows, columns, scorer=Indel.distance, dtype=np.int64, workers=-1)
    m = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))[:, None]
    n = np.fromiter(map(len, columns), dtype=np.int64, count=len(columns))[None, :]
    return _f1_from_lcs((m + n - distances) // 2, m, n).max(axis=1).tolist()


def _id_char(token_id: int) -> str:
    return chr(token_id if token_id < _SURROGATES_START else token_id + _SURROGATES_SIZE)


def _token_ids(seqs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every token id of `seqs`, concatenated, and each sequence's length (int64 arrays)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    codes = np.frombuffer("".join(seqs).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    return codes - (codes >= _SURROGATES_START) * _SURROGATES_SIZE, lengths


def min_shared_tokens(length: int, threshold: float) -> int:
    """Fewest tokens (with multiplicity) a sequence of `length` must share with another to score above `threshold`."""
    t = max(threshold - _BOUND_SLACK, 0.0)
    return math.floor(t * length / (2 - t)) + 1


def length_window(length: int, threshold: float) -> tuple[float, float]:
    """Open interval of partner lengths n with 2*min(m,n)/(m+n) > threshold (the length bound)."""
    t = max(threshold - _BOUND_SLACK, 0.0)
    if t <= 0:
        return 0.0, math.inf
    return t * length / (2 - t), length * (2 - t) / t


def min_overlap(total_length: int, threshold: float) -> int:
    """Fewest shared tokens two sequences of lengths summing to `total_length` need to score above `threshold`."""
    t = max(threshold - _BOUND_SLACK, 0.0)
    return math.floor(t * total_length / 2) + 1


class _Postings:
    """Prefix elements of some pool members, sorted by (element, length) for range lookups.

    `keys` = element << _LEN_BITS | min(length, _LEN_CAP), so the postings of one element are
    contiguous and sorted by the member's length: a length window is one searchsorted range.
    `ones`, `twos`: the member's bucket bitmaps (`_Elements.bitmaps`), beside each posting so
    that a match reads them in order with the posting instead of from the pool at random.
    """

    FIELDS = ("keys", "items", "positions", "ones", "twos")
    __slots__ = ("keys", "items", "positions", "ones", "twos")

    def __init__(self, keys: np.ndarray, items: np.ndarray, positions: np.ndarray, ones: np.ndarray,
                 twos: np.ndarray, presorted: bool = False):
        order = slice(None) if presorted else np.argsort(keys, kind="stable")
        self.keys, self.items, self.positions = keys[order], items[order], positions[order]
        self.ones, self.twos = ones[order], twos[order]

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def merged(first: "_Postings", second: "_Postings") -> "_Postings":
        """The two runs as one, by a linear merge of their sorted keys (`second` after `first`
        on equal keys, as a stable sort of the concatenation would put them)."""
        size = len(first) + len(second)
        at_second = np.searchsorted(first.keys, second.keys, side="right") + np.arange(len(second))
        at_first = np.ones(size, dtype=bool)
        at_first[at_second] = False
        fields = []
        for name in _Postings.FIELDS:
            merged = np.empty(size, dtype=getattr(first, name).dtype)
            merged[at_first], merged[at_second] = getattr(first, name), getattr(second, name)
            fields.append(merged)
        return _Postings(*fields, presorted=True)


class _Elements:
    """The token-id sequences of some texts as flat arrays, each sorted by the global order.

    The k-th copy of a token in a sequence is its own element `token + k * _COPY_STRIDE`, so the
    overlap of two element sets is exactly the overlap of the two token bags.
    """

    __slots__ = ("lengths", "owner", "position", "element", "first_copy_token", "long", "short", "_bitmaps")

    def __init__(self, seqs: list[str], rank: np.ndarray, prefix_sizes: tuple[np.ndarray, np.ndarray]):
        tokens, self.lengths = _token_ids(seqs)
        owner = np.repeat(np.arange(len(seqs)), self.lengths)
        order = np.lexsort((rank[tokens], owner))  # ranks are unique per token: one strict order
        tokens = tokens[order]
        count = len(tokens)
        index = np.arange(count)
        self.position = index - np.repeat(np.cumsum(self.lengths) - self.lengths, self.lengths)
        new_run = np.ones(count, dtype=bool)
        new_run[1:] = (tokens[1:] != tokens[:-1]) | (owner[1:] != owner[:-1])
        copy = index - np.maximum.accumulate(np.where(new_run, index, 0))
        self.owner = owner
        self.element = tokens + copy * _COPY_STRIDE
        self.first_copy_token = tokens[new_run]
        # Two prefixes per sequence (see RougeIndex._ensure_tables): the long one, valid
        # against any partner, and the short one, valid against partners at least as long.
        long_sizes, short_sizes = prefix_sizes
        self.long = self.position < long_sizes[self.lengths][owner]
        self.short = self.position < short_sizes[self.lengths][owner]
        self._bitmaps = None

    def sketches(self) -> np.ndarray:
        """Per sequence, its token count in each hash bucket (see _SKETCH_BUCKETS)."""
        tokens = self.element % _COPY_STRIDE
        bucket = ((tokens * _HASH_MULTIPLIER) & 0xFFFFFFFF) >> _SKETCH_SHIFT
        counts = np.bincount(self.owner * _SKETCH_BUCKETS + bucket, minlength=len(self.lengths) * _SKETCH_BUCKETS)
        return np.minimum(counts, _SKETCH_MAX).reshape(len(self.lengths), _SKETCH_BUCKETS).astype(np.uint8)

    def bitmaps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per sequence, over 64 hash buckets of its tokens: the buckets holding at least one
        token, those holding at least two (uint64 bitmaps), and its tokens beyond two per bucket.

        For two sequences, the bag overlap is at most the sum over buckets of the smaller count,
        which is popcount(ones & ones') + popcount(twos & twos') plus, at most, the first one's
        tokens beyond two per bucket: an upper bound from a few word operations a pair.
        """
        if self._bitmaps is None:
            tokens = self.element % _COPY_STRIDE
            bucket = ((tokens * _HASH_MULTIPLIER) & 0xFFFFFFFF) >> _BITMAP_SHIFT
            counts = np.bincount(self.owner * _BITMAP_BUCKETS + bucket,
                                 minlength=len(self.lengths) * _BITMAP_BUCKETS).reshape(-1, _BITMAP_BUCKETS)
            ones = np.packbits(counts >= 1, axis=1, bitorder="little").view(np.uint64)[:, 0]
            twos = np.packbits(counts >= 2, axis=1, bitorder="little").view(np.uint64)[:, 0]
            self._bitmaps = ones, twos, np.maximum(counts - 2, 0).sum(axis=1)
        return self._bitmaps

    def postings(self, items: np.ndarray, p: np.ndarray) -> _Postings:
        """The elements where mask `p` holds as postings; `items[owner]` is each sequence's pool position."""
        owner = self.owner[p]
        ones, twos, _ = self.bitmaps()
        return _Postings((self.element[p] << _LEN_BITS) | np.minimum(self.lengths[owner], _LEN_CAP), items[owner],
                         self.position[p], ones[owner], twos[owner])


class RougeIndex:
    """A growing pool of texts, searchable for the highest ROUGE-L F1 against it.

    `best_matches(texts)` returns, per text, `(score, item_id)`:
    - when some pool member scores above `threshold`, the score is the exact highest ROUGE-L
      F1 against the whole pool and `item_id` the earliest-added member with that score;
    - otherwise `score` is the highest among the pool members the index had to examine (those
      passing every bound), which is a lower bound of the true highest, and `item_id` is the
      member it came from, whose score is exact; `(0.0, None)` when nothing was examined.

    `add_unless_similar(items)` is the greedy filter: each item is added unless it scores above
    the threshold against the pool, which includes the items of the same call that were added
    before it, exactly as if they were checked one at a time in order.
    """

    def __init__(self, threshold: float = NEAR_DUPLICATE_THRESHOLD, tokenizer: str = "multilingual",
                 block_size: int = DEFAULT_BLOCK_SIZE):
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {threshold}")
        self.threshold = threshold
        self.tokenizer = tokenizer
        self.block_size = block_size
        self._vocab: dict[str, str] = {}  # token -> its id as one character
        # Per token id, grown by doubling: pool members containing it, and its place in the
        # global order. Ranks are unique; a token unseen at the last count gets rank -1 - id,
        # so it sorts before every counted one (as the rarest), and ties never happen.
        self._doc_freq = np.zeros(_INITIAL_CAPACITY, dtype=np.int64)
        self._rank = np.zeros(_INITIAL_CAPACITY, dtype=np.int64)
        self._ordered_at = 0  # pool size when the ranks were last counted
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._seqs: list[str] = []
        # The sequences again as a numpy object array (grown by doubling), so a block's pairs
        # are gathered by fancy indexing in C rather than a Python loop; lengths likewise.
        self._seq_array = np.empty(_INITIAL_CAPACITY, dtype=object)
        self._length_array = np.zeros(_INITIAL_CAPACITY, dtype=np.int64)
        self._sketches = np.zeros((_INITIAL_CAPACITY, _SKETCH_BUCKETS), dtype=np.uint8)
        self._positions: dict[str, int] = {}
        self._longest = 0  # longest sequence in the pool
        # Postings in runs of decreasing size (merged like a binary counter), so adding a block
        # costs O(log pool) amortised and no sorted array is ever rebuilt whole per block.
        self._runs: list[_Postings] = []
        self._pending: list[int] = []  # pool positions added one by one, indexed at the next query
        self._encoded: dict[str, str] = {}  # text -> sequence, from prepare_order
        self._tables_for = -1
        self._ensure_tables(_INITIAL_CAPACITY)
        # Pair counts, for reports: every pair the greedy filter could have compared (each item
        # against the pool before its block and the block's earlier items), those it scored
        # exactly, and those `add_unless_similar_exact` bounded over the small alphabet.
        self.pairs_possible = 0
        self.pairs_compared = 0
        self.pairs_bounded = 0
        # Texts added or decided that are not blank, and those among them that gave no tokens
        # (any Japanese text under the `rouge` tokenizer): such a text matches nothing, so the
        # stage must say so rather than silently keep every one (see `tokenless_warning`).
        self.texts_seen = 0
        self.tokenless = 0
        self.tokenless_example: str | None = None

    # --- pool --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._positions

    def text_of(self, item_id: str) -> str:
        return self._texts[self._positions[item_id]]

    def add(self, item_id: str, text: str) -> None:
        """Add one text to the pool, unconditionally."""
        seq = self.encode(text)
        self._count_tokenless([text], [seq])
        self._pending.extend(self._append([(item_id, text)], [seq]))

    def add_all(self, items: list[tuple[str, str]]) -> None:
        """`add` for each `(item_id, text)` in order, in one pass (a filter's seeds)."""
        if not items:
            return
        texts = [text for _, text in items]
        seqs = self._encode_block(texts)
        self._count_tokenless(texts, seqs)
        self._pending.extend(self._append(items, seqs))

    def _count_tokenless(self, texts: list[str], seqs: list[str]) -> None:
        self.texts_seen += sum(map(bool, map(str.strip, texts)))  # C-level loops: called per block
        if "" not in seqs:
            return
        for text, seq in zip(texts, seqs):
            if not seq and text.strip():
                self.tokenless += 1
                self.tokenless_example = self.tokenless_example or text

    def tokenless_warning(self, flag: str = "--tokenizer") -> str | None:
        """One line when some non-blank texts gave no tokens (they can match nothing), else None."""
        if not self.tokenless:
            return None
        example = self.tokenless_example if len(self.tokenless_example) <= _EXAMPLE_CHARS else \
            self.tokenless_example[:_EXAMPLE_CHARS] + "…"
        return (f"{flag} {self.tokenizer}: {self.tokenless:,} of {self.texts_seen:,} texts gave no tokens "
                f"(e.g. {example!r}), so they were never compared and none of them was dropped as a near "
                f"duplicate; use {flag} multilingual for Japanese or other text outside [a-z0-9]")

    def prepare_order(self, texts) -> None:
        """Count token frequencies over `texts` (e.g. all candidates of a batch job) to order tokens
        rarest first before anything is added. Optional: it only makes queries cheaper."""
        texts = list(texts)
        with _collector_paused():
            seqs = self._encode_all(texts)
        self._ensure_tables(max(map(len, seqs), default=0))
        pool_counts = self._doc_freq.copy()
        # Texts containing each token: distinct (text, token) pairs, by one sort of packed keys.
        tokens, lengths = _token_ids(seqs)
        keys = np.sort((np.repeat(np.arange(len(seqs), dtype=np.int64), lengths) << _TOKEN_BITS) | tokens)
        distinct = keys[np.append(True, keys[1:] != keys[:-1])] if len(keys) else keys
        self._doc_freq += np.bincount(distinct & ((1 << _TOKEN_BITS) - 1), minlength=len(self._doc_freq))
        self._reorder()
        # The counts above were hints about texts not in the pool, so the order holds until the
        # pool outgrows them; the pool's own counts restart from what it holds.
        self._ordered_at = max(self._ordered_at, len(texts))
        self._doc_freq = pool_counts
        # Token ids never change, so these encodings stay valid; each is used once, by the
        # query or add of the same text (tokenizing is a large share of a batch job's time).
        self._encoded = dict(zip(texts, seqs))

    def _encode_all(self, texts: list[str]) -> list[str]:
        """`encode` of each text, in one pass: new tokens get ids in order of first appearance,
        as one `encode` call after another would give, and the rest is C-level maps and one
        split (a Python loop per token was about half the time of a million-record filter's
        encoding, and a split per text a quarter of what remained on 2,000)."""
        stream = _token_stream(texts, self.tokenizer)
        vocab = self._vocab
        self._add_tokens([token for token in dict.fromkeys(stream) if token not in vocab and token != _BATCH_SEPARATOR])
        # Every token is in the vocabulary now; the separator alone is not, and maps to the id separator.
        return "".join(map(vocab.get, stream, repeat(_ID_SEPARATOR))).split(_ID_SEPARATOR)[:-1]

    def _encode_block(self, texts: list[str]) -> list[str]:
        """`encode` of each text: those prepared by `prepare_order` by one dict pop each."""
        if not self._encoded:
            return self._encode_all(texts)
        pop = self._encoded.pop
        seqs = [pop(text, None) for text in texts]
        if None in seqs:
            seqs = [self.encode(text) if seq is None else seq for text, seq in zip(texts, seqs)]
        return seqs

    def encode(self, text: str) -> str:
        """The token-id sequence of `text`, one character per token."""
        seq = self._encoded.pop(text, None)  # already encoded by prepare_order
        if seq is not None:
            return seq
        vocab = self._vocab
        return "".join([vocab.get(token) or self._char(token) for token in tokenize(text, self.tokenizer)])

    def _add_tokens(self, tokens: list[str]) -> None:
        """`_char` for many new tokens at once: the same ids, in order, and ranks."""
        start, end = len(self._vocab), len(self._vocab) + len(tokens)
        if end > MAX_VOCAB:
            raise ValueError(f"more than {MAX_VOCAB:,} distinct tokens; the index cannot hold more")
        # Every new id's character at once (the `_id_char` rule on an array: one decode, not a
        # call per token; a million-record filter adds a few hundred thousand tokens).
        codes = np.arange(start, end, dtype=np.uint32)
        codes += (codes >= _SURROGATES_START) * np.uint32(_SURROGATES_SIZE)
        self._vocab.update(zip(tokens, codes.tobytes().decode("utf-32-le")))
        while end > len(self._rank):
            self._rank = np.concatenate([self._rank, np.zeros(len(self._rank), dtype=np.int64)])
            self._doc_freq = np.concatenate([self._doc_freq, np.zeros(len(self._doc_freq), dtype=np.int64)])
        self._rank[start:end] = -1 - np.arange(start, end)

    def _char(self, token: str) -> str:
        token_id = len(self._vocab)
        if token_id >= MAX_VOCAB:
            raise ValueError(f"more than {MAX_VOCAB:,} distinct tokens; the index cannot hold more")
        ch = self._vocab[token] = _id_char(token_id)
        if token_id == len(self._rank):
            self._rank = np.concatenate([self._rank, np.zeros(token_id, dtype=np.int64)])
            self._doc_freq = np.concatenate([self._doc_freq, np.zeros(token_id, dtype=np.int64)])
        self._rank[token_id] = -1 - token_id
        return ch

    def _ensure_tables(self, length: int) -> None:
        """Per-length bound tables (from the scalar bound functions) for sequences up to `length`."""
        if length <= self._tables_for:
            return
        size = max(2 * length, _INITIAL_CAPACITY) + 1
        # The scalar bound functions' float operations, elementwise in the same order (numpy's
        # float64 rounds each exactly as Python does), so every entry equals its scalar value
        # (tests pin that); a Python loop over a few thousand lengths cost ~10 ms per index.
        t = max(self.threshold - _BOUND_SLACK, 0.0)
        m = np.arange(size, dtype=np.int64)
        shared = np.floor(t * m.astype(np.float64) / (2 - t)).astype(np.int64) + 1  # min_shared_tokens
        overlap = np.floor(t * np.arange(2 * size + 1, dtype=np.float64) / 2).astype(np.int64) + 1  # min_overlap
        # Long prefix: m - alpha(m) + 1, enough against a partner of any length. Short prefix:
        # against a partner at least as long the overlap must be at least min_overlap(2m) >=
        # alpha(m), so m - min_overlap(2m) + 1 elements suffice. A pair is found by probing the
        # longer member's long prefix against the shorter one's short prefix (AllPairs gets
        # the same saving by processing records in length order, which a greedy filter cannot).
        self._prefix_sizes = (np.where(m > 0, np.maximum(m - shared + 1, 0), 0),
                              np.where(m > 0, np.maximum(m - overlap[2 * m] + 1, 0), 0))
        if t <= 0:  # length_window: no bound at threshold 0
            self._min_length = np.ones(size, dtype=np.int64)
            self._max_length = np.full(size, _BIG_LENGTH, dtype=np.int64)
        else:
            low, high = t * m.astype(np.float64) / (2 - t), m.astype(np.float64) * (2 - t) / t
            self._min_length = np.floor(low).astype(np.int64) + 1
            self._max_length = np.where(high < _BIG_LENGTH, np.ceil(high) - 1, _BIG_LENGTH).astype(np.int64)
        self._min_overlap = overlap
        self._tables_for = size - 1

    def _append(self, items: list[tuple[str, str]], seqs: list[str]) -> list[int]:
        """Put items into the pool (not yet into the postings); their positions."""
        start = len(self._ids)
        ids = [item_id for item_id, _ in items]
        new = dict(zip(ids, range(start, start + len(ids))))
        if len(new) < len(ids) or not self._positions.keys().isdisjoint(new):
            seen = set(self._positions)
            duplicate = next(item_id for item_id in ids if item_id in seen or seen.add(item_id))
            raise ValueError(f"duplicate id {duplicate!r} in the ROUGE-L pool")
        self._positions.update(new)
        self._ids.extend(ids)
        self._texts.extend(text for _, text in items)
        self._seqs.extend(seqs)
        end = len(self._ids)
        while end > len(self._seq_array):
            capacity = 2 * len(self._seq_array)
            seq_array = np.empty(capacity, dtype=object)
            seq_array[:start] = self._seq_array[:start]
            self._seq_array = seq_array
            self._length_array = np.concatenate([self._length_array[:start], np.zeros(capacity - start, dtype=np.int64)])
            self._sketches = np.concatenate([self._sketches[:start],
                                             np.zeros((capacity - start, _SKETCH_BUCKETS), dtype=np.uint8)])
        self._seq_array[start:end] = seqs if seqs else []
        self._length_array[start:end] = [len(seq) for seq in seqs]
        self._longest = max(self._longest, max(map(len, seqs), default=0))
        return list(range(start, end))

    def _index(self, positions: list[int]) -> None:
        """Add the prefixes of these pool members to the postings."""
        if not positions:
            return
        seqs = [self._seqs[p] for p in positions]
        self._ensure_tables(max(map(len, seqs)))
        elements = _Elements(seqs, self._rank, self._prefix_sizes)
        np.add.at(self._doc_freq, elements.first_copy_token, 1)
        items = np.asarray(positions, dtype=np.int64)
        self._sketches[items] = elements.sketches()
        self._runs.append((elements.postings(items, elements.short), elements.postings(items, elements.long)))
        while len(self._runs) > 1 and len(self._runs[-1][1]) * _RUN_MERGE_RATIO >= len(self._runs[-2][1]):
            short, long = self._runs.pop()
            self._runs[-1] = (_Postings.merged(self._runs[-1][0], short), _Postings.merged(self._runs[-1][1], long))

    def _flush(self) -> None:
        """Index the members added since the last query (and re-count the order if the pool has
        grown enough): a pool that is never queried is never indexed."""
        pending, self._pending = self._pending, []
        self._index(pending)
        self._maybe_reorder()

    def _maybe_reorder(self) -> None:
        if len(self._ids) >= max(self._ordered_at, 1) * REORDER_GROWTH:
            self._reorder()

    def _reorder(self) -> None:
        """Re-count the global token order and re-index every prefix under it."""
        vocab = len(self._vocab)
        by_rarity = np.lexsort((np.arange(vocab), self._doc_freq[:vocab]))
        self._rank[by_rarity] = np.arange(vocab)
        self._ordered_at = len(self._ids)
        doc_freq = self._doc_freq.copy()
        self._runs, self._pending = [], []
        for start in range(0, len(self._ids), _REINDEX_CHUNK):
            self._index(list(range(start, min(start + _REINDEX_CHUNK, len(self._ids)))))
        self._doc_freq = doc_freq  # _index counted every member again

    # --- search ------------------------------------------------------------------------

    def _packing(self, queries: np.ndarray, items: int) -> int | None:
        """Bits for a query number when (item, query, i, j) of a match fit one int64 (then a match
        is one packed integer and grouping is one plain sort); None when they do not."""
        query_bits = max(len(queries), 1).bit_length()
        longest = max(self._longest, int(queries.max(initial=0)))
        if longest > 1 << _POS_BITS or query_bits + max(items, 1).bit_length() + 2 * _POS_BITS > _PACK_BITS:
            return None
        return query_bits

    def _probes(self, elements: _Elements, p: np.ndarray, longer: bool) -> tuple[np.ndarray, ...]:
        """The queries' prefix elements `p` as probes for items longer than the query (`longer`)
        or at most as long: (query, i, m, lowest key, highest key), sorted by lowest key. The
        same for every postings run, so built once per search."""
        owner, position = elements.owner[p], elements.position[p]
        lengths = elements.lengths[owner]
        base = elements.element[p] << _LEN_BITS
        if longer:
            shortest, longest = lengths + 1, self._max_length[lengths]
        else:
            shortest, longest = self._min_length[lengths], lengths
        # The query's prefix is sized for its shortest possible partner; against a partner of
        # length n, the first m - min_overlap(m+n) + 1 elements are enough. So an element at
        # position i only needs partners with min_overlap(m+n) <= m - i: a narrower length
        # window for the later (commoner, longer-listed) prefix elements. Per pair, the query
        # side's matches are still all its shared elements in one prefix of the query, which
        # is what the positional filter in `_candidates` needs.
        longest = np.minimum(longest, np.searchsorted(self._min_overlap, lengths - position, side="right") - 1 - lengths)
        lowest = base | np.minimum(shortest, _LEN_CAP)
        highest = base | np.clip(longest, 0, _LEN_CAP)
        # numpy's binary search narrows from the previous answer when the needles ascend, so
        # sorted needles walk the postings once instead of jumping across them.
        order = np.argsort(lowest)
        ones, twos, extra = (x[owner[order]] for x in elements.bitmaps())
        # The fewest shared tokens any partner in the window needs (the need grows with n), less
        # the query's tokens beyond two per bucket: the bitmap bound's first cut (`_matches`).
        least = self._min_overlap[lengths + np.minimum(shortest, len(self._min_overlap) - 1 - lengths)][order]
        cut = np.clip(least - extra, 0, _UINT8_MAX).astype(np.uint8)
        return owner[order], position[order], lengths[order], lowest[order], highest[order], ones, twos, extra, cut

    def _matches(self, postings: _Postings, probes: tuple[np.ndarray, ...], packing: int | None):
        """Every shared element of the probes and the postings within the probes' length windows:
        (query, i, item, j) arrays (i, j: the element's positions), or those packed into one
        int64 each (item first: pairs then come out grouped by item, see `_candidates`)."""
        owner, position, lengths, lowest, highest, ones, twos, extra, cut = probes
        low = np.searchsorted(postings.keys, lowest)
        counts = np.maximum(np.searchsorted(postings.keys, highest, side="right") - low, 0)
        probe = np.repeat(np.arange(len(counts)), counts)
        found = np.repeat(low - (np.cumsum(counts) - counts), counts) + np.arange(len(probe))
        # The pair's bag-overlap bound from the bucket bitmaps (`_Elements.bitmaps`): a function
        # of the pair alone, so it drops every match of a pair or none. First against the
        # fewest shared tokens any partner in the window needs, in uint8 and without reading
        # the partner's length: it removes about 99% of the matches on the synthetic million,
        # in the fewest passes over them, before the sort that groups them into pairs.
        bound = (np.bitwise_count(ones[probe] & postings.ones[found])
                 + np.bitwise_count(twos[probe] & postings.twos[found]))
        live = np.flatnonzero(bound >= cut[probe])
        probe, found, bound = probe[live], found[live], bound[live]
        # Then with the partner's length n: the bound against the pair's own need, and the
        # item's side of the prefix: its stored prefix is sized for its shortest possible
        # partner, and against this query only positions j <= n - min_overlap(m+n) are needed.
        # Each pair's matches stay the shared elements of two prefixes, as `_candidates` needs.
        n = postings.keys[found] & _LEN_CAP
        need = self._min_overlap[lengths[probe] + n]
        live = np.flatnonzero(((postings.positions[found] <= n - need) & (bound + extra[probe] >= need))
                              | (n == _LEN_CAP))  # a capped length is not the item's length: keep
        probe, found = probe[live], found[live]
        if packing is not None:
            head = (owner << (2 * _POS_BITS)) | (position << _POS_BITS)
            return (postings.items[found] << (packing + 2 * _POS_BITS)) | head[probe] | postings.positions[found]
        return owner[probe], position[probe], postings.items[found], postings.positions[found]

    def _all_matches(self, runs: list[tuple[_Postings, _Postings]], elements: _Elements, packing: int | None) -> list:
        """Matches against items at most as long as the query (query's long prefix, their short
        one) and against longer items (query's short prefix, their long one)."""
        up_to, longer = self._probes(elements, elements.long, False), self._probes(elements, elements.short, True)
        out = []
        for short, long in runs:
            out.append(self._matches(short, up_to, packing))
            out.append(self._matches(long, longer, packing))
        return out

    def _candidates(self, matches: list, query_lengths: np.ndarray, item_lengths: np.ndarray, items: int,
                    packing: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Pairs (query, item) that pass the length and positional bounds, sorted by item then query.

        Item-major, so the per-pair reads of pool arrays that follow (sketches, sequences) walk
        them in order instead of jumping across them (a random read of a million-member pool is
        a cache miss each; in order it was 2.5 times faster). Every user needs only that a
        query's items ascend, and the greedy settle loop that an earlier item's pairs come first.

        For a pair, the shared prefix elements are exactly its shared elements up to the last of
        them, w (both prefixes hold everything before w in the order); the rest of the overlap
        lies after w in both sequences, so overlap <= shared prefix count + min(m-1-i, n-1-j),
        where w sits at i and j (PPJoin's positional filter). The shared elements of a pair have
        increasing i and j together, so after sorting by (pair, i) the last match holds both.
        """
        empty = np.empty(0, dtype=np.int64)
        if packing is not None:
            packed = np.sort(np.concatenate(matches)) if matches else empty
            pair = packed >> (2 * _POS_BITS)
            ends = np.flatnonzero(np.append(pair[1:] != pair[:-1], True)) if len(pair) else empty
            last = packed[ends]
            last_i, last_j = (last >> _POS_BITS) & _POS_MASK, last & _POS_MASK
            b, a = pair[ends] >> packing, pair[ends] & ((1 << packing) - 1)
        else:
            queries = len(query_lengths)
            query = np.concatenate([m[0] for m in matches]) if matches else empty
            pair = (np.concatenate([m[2] for m in matches]) if matches else empty) * queries + query
            i = np.concatenate([m[1] for m in matches]) if matches else empty
            order = np.lexsort((i, pair))
            pair = pair[order]
            ends = np.flatnonzero(np.append(pair[1:] != pair[:-1], True)) if len(pair) else empty
            last_i, last_j = i[order][ends], np.concatenate([m[3] for m in matches])[order][ends] if matches else empty
            b, a = np.divmod(pair[ends], queries)
        shared = np.diff(np.concatenate([[-1], ends]))
        m, n = query_lengths[a], item_lengths[b]
        bound = shared + np.minimum(m - 1 - last_i, n - 1 - last_j)
        keep = (bound >= self._min_overlap[m + n]) & (n >= self._min_length[m]) & (n <= self._max_length[m])
        return a[keep], b[keep]

    def _bag_bound(self, a: np.ndarray, b: np.ndarray, query_sketches: np.ndarray, item_sketches: np.ndarray,
                   query_lengths: np.ndarray, item_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pairs whose bag-overlap bound (from the sketches) still allows a score above the threshold."""
        keep = np.empty(len(a), dtype=bool)
        for start in range(0, len(a), _SKETCH_CHUNK):
            qa, qb = a[start:start + _SKETCH_CHUNK], b[start:start + _SKETCH_CHUNK]
            m, n = query_lengths[qa], item_lengths[qb]
            overlap = _sketch_overlap(query_sketches, item_sketches, qa, qb)
            keep[start:start + _SKETCH_CHUNK] = ((overlap >= self._min_overlap[m + n])
                                                 | (m > _SKETCH_MAX) | (n > _SKETCH_MAX))
        return a[keep], b[keep]

    def _pool_candidates(self, elements: _Elements) -> tuple[np.ndarray, np.ndarray]:
        size = len(self._ids)
        packing = self._packing(elements.lengths, size)
        matches = self._all_matches(self._runs, elements, packing)
        a, b = self._candidates(matches, elements.lengths, self._length_array[:size], size, packing)
        return self._bag_bound(a, b, elements.sketches(), self._sketches, elements.lengths, self._length_array)

    def _best_per_query(self, a: np.ndarray, scores: np.ndarray, queries: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query, the highest score among its pairs and the index of the first pair with it (-1: none).

        A query's pairs come in ascending item order (`_candidates`), so the first pair with the
        highest score is the earliest-added item with it.
        """
        best = np.zeros(queries)
        where = np.full(queries, -1, dtype=np.int64)
        if len(a):
            order = np.lexsort((np.arange(len(a)), -scores, a))
            first = order[np.concatenate([[True], a[order][1:] != a[order][:-1]])]
            best[a[first]] = scores[first]
            where[a[first]] = first
        return best, where

    def _object_array(self, seqs: list[str]) -> np.ndarray:
        out = np.empty(len(seqs), dtype=object)
        out[:] = seqs
        return out

    def best_matches(self, texts: list[str]) -> list[tuple[float, str | None]]:
        """Per text, `(highest ROUGE-L F1, pool id)` against the pool; exact above the threshold (class doc)."""
        seqs = [self.encode(text) for text in texts]
        if not seqs:
            return []
        self._flush()  # before the query's elements: a re-count changes the order they are sorted by
        self._ensure_tables(max(map(len, seqs)))
        elements = _Elements(seqs, self._rank, self._prefix_sizes)
        a, b = self._pool_candidates(elements)
        scores = _scores(self._object_array(seqs), self._seq_array, a, b, elements.lengths, self._length_array)
        best, where = self._best_per_query(a, scores, len(seqs))
        return [(float(s), self._ids[b[w]]) if w >= 0 else (0.0, None) for s, w in zip(best.tolist(), where.tolist())]

    # --- greedy filter -----------------------------------------------------------------

    def add_unless_similar(self, items: list[tuple[str, str]],
                           on_block: Callable[[int], None] | None = None) -> list[tuple[bool, float, str | None]]:
        """Greedy filter over `(item_id, text)` in order; per item `(added, score, most_similar_id)`.

        An item is added unless its highest ROUGE-L F1 against the pool (earlier items of this
        call included) is above the threshold. The decision is exact; `score` is exact when above
        the threshold and a lower bound otherwise (see the class doc). `on_block(n)` is called
        after each block with the number of items it settled (for a progress bar).
        """
        results: list[tuple[bool, float, str | None]] = []
        with _collector_paused():
            for start in range(0, len(items), self.block_size):
                block = items[start:start + self.block_size]
                results.extend(self._settle_block(block))
                if on_block is not None:
                    on_block(len(block))
        return results

    def _settle_block(self, block: list[tuple[str, str]]) -> list[tuple[bool, float, str | None]]:
        texts = [text for _, text in block]
        seqs = self._encode_block(texts)
        self._count_tokenless(texts, seqs)
        self._flush()  # before the block's elements: a re-count changes the order they are sorted by
        self._ensure_tables(max(map(len, seqs)))
        elements = _Elements(seqs, self._rank, self._prefix_sizes)
        seq_array = self._object_array(seqs)
        lengths = elements.lengths
        pool_size = len(self._ids)

        # Against the pool before the block: one best per item.
        a, b = self._pool_candidates(elements)
        scores = _scores(seq_array, self._seq_array, a, b, lengths, self._length_array)
        pool_best, where = self._best_per_query(a, scores, len(seqs))
        pool_best_id = [self._ids[b[w]] if w >= 0 else None for w in where.tolist()]
        # Against earlier items of the block: the same bounds, on the block's own postings.
        items = np.arange(len(seqs))
        block_runs = [(elements.postings(items, elements.short), elements.postings(items, elements.long))]
        packing = self._packing(lengths, len(seqs))
        qa, qb = self._candidates(self._all_matches(block_runs, elements, packing), lengths, lengths, len(seqs), packing)
        earlier = qb < qa
        sketches = elements.sketches()
        qa, qb = self._bag_bound(qa[earlier], qb[earlier], sketches, sketches, lengths, lengths)
        block_scores = _scores(seq_array, seq_array, qa, qb, lengths, lengths)

        self.pairs_possible += len(seqs) * pool_size + len(seqs) * (len(seqs) - 1) // 2
        self.pairs_compared += len(a) + len(qa)
        threshold = self.threshold
        added = (pool_best <= threshold).tolist()
        best = pool_best.tolist()
        best_id = pool_best_id
        # Settle in order: an earlier item of the block counts only if it was added. Pairs are
        # sorted by partner (then item), so a partner's own pairs, which settle it, all come
        # before the pairs where it is the partner; and an item's partners ascend, so on a tie
        # the pool (checked first) and then the earliest partner win, as in a sequential scan.
        for i, j, score in zip(qa.tolist(), qb.tolist(), block_scores.tolist()):
            if added[j] and score > best[i]:
                best[i], best_id[i] = score, block[j][0]
                if score > threshold:
                    added[i] = False
        kept = [k for k, keep in enumerate(added) if keep]
        positions = self._append([block[k] for k in kept], [seqs[k] for k in kept])
        self._index(positions)
        self._maybe_reorder()
        return [(keep, score, item_id) for keep, score, item_id in zip(added, best, best_id)]

    # --- exact scores for reports -------------------------------------------------------

    def add_unless_similar_exact(self, items: list[tuple[str, str]], chunk: int = 256,
                                 on_block: Callable[[int], None] | None = None) -> list[tuple[bool, float, str | None]]:
        """`add_unless_similar` with every score exact, the added items' too: the same decisions,
        and per item its exact highest ROUGE-L F1 against the pool when it was decided, and the
        earliest-added member with it.

        It bounds every (item, earlier member or item) pair as `exact_best_earlier` does, so its
        cost grows with the pool squared: for a pool of a few thousand, where the report wants
        every score exact anyway, one pass that bounds each pair once is cheaper than the index's
        decisions followed by `exact_best_earlier`. Items go `chunk` at a time, in order. While a
        second thread bounds a chunk against every sequence before it (rapidfuzz and numpy
        release the GIL), this one encodes the next chunk and settles the one before: the pairs
        whose bound reaches the threshold are scored exactly and decide its items in order, as
        the greedy rule does; then the dropped items' columns are cleared and each row's best
        is sifted. The added items join the pool, and the postings at the next query.
        """
        if not items:
            return []
        start = len(self._ids)  # the pool before the call; item k is sequence start + k
        total = start + len(items)
        ids = self._ids + [item_id for item_id, _ in items]
        seqs = list(self._seqs)
        seq_array = np.empty(total, dtype=object)
        seq_array[:start] = self._seq_array[:start]
        lengths = np.zeros(total, dtype=np.int64)
        lengths[:start] = self._length_array[:start]
        half_lengths = _half_lengths(lengths)
        in_pool = np.ones(total, dtype=bool)  # an item's entry turns False when it is dropped
        alphabet: _SmallAlphabet | None = None
        small: list[str] = []
        best: list[tuple[float, int]] = []

        def settle(rows: np.ndarray, bounded: Future) -> None:
            bound = bounded.result()
            # The pairs that can decide a row: their exact scores settle the rows in order, since
            # they come by row, then column (a column inside the chunk is an earlier row, settled).
            high = np.flatnonzero(bound >= np.float32(self.threshold - _BOUND_MARGIN))
            r, c = np.divmod(high, bound.shape[1])
            f1 = _scores(seq_array, seq_array, rows[r], c, lengths, lengths)
            for i, j, score in zip(rows[r].tolist(), c.tolist(), f1.tolist()):
                if score > self.threshold and in_pool[j]:
                    in_pool[i] = False
            bound[:, ~in_pool[:bound.shape[1]]] = -1.0  # dropped items are not in the pool
            chunk_best, scored = _sift_best(bound, rows, seq_array, lengths)
            best.extend(chunk_best)
            self.pairs_compared += len(scored) + len(high) - int(np.isin(high, scored, assume_unique=True).sum())
            if on_block is not None:
                on_block(len(rows))

        # Two chunks are in flight at most (one bounded, one settled), each in a buffer of its own.
        buffers = [np.empty(min(chunk, len(items)) * total, dtype=np.float32) for _ in range(2)]
        # One bound thread: a second one, or the sifts moved to bound threads, measured slower,
        # as both sides then wait on the GIL.
        with _collector_paused(), ThreadPoolExecutor(1) as bounder:
            waiting: list[tuple[np.ndarray, Future]] = []
            for low in range(start, total, chunk):
                texts = [text for _, text in items[low - start:low - start + chunk]]
                block = self._encode_block(texts)
                self._count_tokenless(texts, block)
                rows = np.arange(low, low + len(block))
                seqs.extend(block)
                seq_array[rows] = block
                lengths[rows] = [len(seq) for seq in block]
                half_lengths[rows] = _half_lengths(lengths[rows])
                if alphabet is None:  # the pool's and the first chunk's token counts
                    alphabet = _SmallAlphabet(seqs, len(self._vocab))
                    small.extend(alphabet.rewrite(self._seqs))
                small.extend(alphabet.rewrite(block))
                out = buffers[(low - start) // chunk % len(buffers)]
                waiting.append((rows, bounder.submit(_bounds, small, half_lengths, rows, out)))
                if len(waiting) > 1:
                    settle(*waiting.pop(0))
            for rows, bounded in waiting:
                settle(rows, bounded)
        added = in_pool[start:].tolist()
        self.pairs_possible += sum(range(start, total))  # each item against all before it
        self.pairs_bounded += sum(range(start, total))
        kept = [k for k, keep in enumerate(added) if keep]
        self._pending.extend(self._append([items[k] for k in kept], [seqs[start + k] for k in kept]))
        return [(keep, score, ids[j] if j >= 0 else None) for keep, (score, j) in zip(added, best)]

    def exact_best_earlier(self, positions: list[int], chunk: int = 256) -> list[tuple[float, str | None]]:
        """Exact highest ROUGE-L F1 of pool member `p` against pool members added before it, for each p.

        Rows go in position order, `chunk` at a time. Each chunk is bounded against every earlier
        member in one rapidfuzz call over the small alphabet (`_SmallAlphabet`), and only the
        pairs whose bound reaches the exact score of the row's best-bounded pair are scored on
        the real tokens: on 2,000 Alpaca instructions ~3 pairs a row instead of ~1,000.
        """
        out: dict[int, tuple[float, str | None]] = {}
        ordered = sorted(set(positions))
        if not ordered:
            return []
        pool = self._seqs[:ordered[-1] + 1]
        small = _SmallAlphabet(pool, len(self._vocab)).rewrite(pool)
        chunks = [ordered[start:start + chunk] for start in range(0, len(ordered), chunk)]
        seq_array, lengths = self._seq_array, self._length_array
        half_lengths = _half_lengths(lengths[:ordered[-1] + 1])

        def best_of(rows: list[int]) -> list[tuple[float, str | None]]:
            row_array = np.asarray(rows)
            best, _ = _sift_best(_bounds(small, half_lengths, row_array), row_array, seq_array, lengths)
            return [(score, self._ids[j] if j >= 0 else None) for score, j in best]

        # Chunks run on every core this process may use (as rapidfuzz's workers=-1 would), one
        # thread each: rapidfuzz and numpy release the GIL, so one chunk's bound matrix is
        # sifted while another's is computed, which rapidfuzz's own threads cannot overlap.
        threads = min(len(chunks), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                scored = list(pool.map(best_of, chunks))
        else:
            scored = [best_of(rows) for rows in chunks]
        for rows, results in zip(chunks, scored):
            out.update(zip(rows, results))
        return [out[p] for p in positions]



def _half_lengths(lengths: np.ndarray) -> np.ndarray:
    """`_bounds`' half lengths: float32 m/2, and 1/4 for an empty sequence, whose LCS with
    anything is 0, so that two of them bound 0 and not 0/0."""
    return np.maximum(lengths, 0.5).astype(np.float32) / 2


class _SmallAlphabet:
    """Token ids rewritten over characters 1..255 (`_SMALL_ALPHABET`), for bounding every pair.

    The `_DISTINCT_CODES` tokens most frequent in the sequences it is made from keep a character
    of their own; the others share the remaining ones by frequency rank, and tokens it never
    saw share them by id. Any common subsequence stays one after the rewrite, so the LCS over
    it bounds the true one from above (shared codes can only add matches) whatever the counts,
    and rapidfuzz reads characters below 256 from a flat table instead of a hash map: the
    whole-pool bound costs about half of scoring every pair on the real ids.
    """

    def __init__(self, seqs: list[str], vocab_size: int):
        tokens, _ = _token_ids(seqs)
        counts = np.bincount(tokens, minlength=vocab_size)
        rank = np.empty(len(counts), dtype=np.int64)
        rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
        self._code = self._shared_code(rank)

    @staticmethod
    def _shared_code(rank: np.ndarray) -> np.ndarray:
        shared = _SMALL_ALPHABET - _DISTINCT_CODES
        return np.where(rank < _DISTINCT_CODES, rank, _DISTINCT_CODES + (rank - _DISTINCT_CODES) % shared) + 1

    def rewrite(self, seqs: list[str]) -> list[str]:
        tokens, lengths = _token_ids(seqs)
        known = len(self._code)
        unseen = self._shared_code(_DISTINCT_CODES + tokens)  # past the distinct ones, by id
        code = np.where(tokens < known, self._code[np.minimum(tokens, known - 1)], unseen) if known else unseen
        text = code.astype(np.uint8).tobytes().decode("latin-1")
        ends = np.cumsum(lengths).tolist()
        return [text[a:b] for a, b in zip([0] + ends[:-1], ends)]


def _scores(query_array: np.ndarray, choice_array: np.ndarray, a: np.ndarray, b: np.ndarray,
            m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Exact ROUGE-L F1 of every pair (queries[a], choices[b]) in one rapidfuzz call (C++, all cores)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    if not len(a):
        return np.empty(0)
    workers = -1 if len(a) >= _PARALLEL_PAIRS else 1
    distances = process.cpdist(query_array[a], choice_array[b], scorer=Indel.distance, dtype=np.int32, workers=workers)
    m, n = m[a], n[b]
    return _f1_from_lcs((m + n - distances) // 2, m, n)


def _bounds(small: list[str], half_lengths: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Per row (ascending positions), the bound of its score against every sequence before the
    last row: float32 2*LCS'/(m+n), LCS' over `_SmallAlphabet`; -1 where the column is not
    before the row. `half_lengths`: `_half_lengths` of every sequence; `out`: a flat float32
    buffer of at least rows x columns to write into.

    rapidfuzz gives the LCS as bytes and numpy divides (LCS / ((m+n)/2) rounds to the same
    float32 as 2*LCS/(m+n)): rapidfuzz's own float score cost half as much again. And a buffer
    used again is written at memory speed, where a fresh matrix per chunk was three times the
    division's cost in page faults.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import LCSseq

    end = int(rows[-1])
    # An LCS fits a byte when every sequence does; the byte result is the fastest to write.
    dtype = np.uint8 if half_lengths.max(initial=0) * 2 <= _UINT8_MAX else np.int32
    lcs = process.cdist([small[p] for p in rows.tolist()], small[:end], scorer=LCSseq.similarity, dtype=dtype,
                        workers=1)
    shape = (len(rows), end)
    bound = np.empty(shape, dtype=np.float32) if out is None else out[:shape[0] * end].reshape(shape)
    np.add(half_lengths[rows, None], half_lengths[None, :end], out=bound)
    np.divide(lcs, bound, out=bound)
    first = int(rows[0])
    if end > first:  # columns from the first row on count only for the rows after them
        bound[:, first:end][np.arange(first, end) >= rows[:, None]] = -1.0
    return bound


def _sift_best(bound: np.ndarray, rows: np.ndarray, seq_array: np.ndarray,
               lengths: np.ndarray) -> tuple[list[tuple[float, int]], np.ndarray]:
    """Per row, `(exact highest F1, the earliest column with it)` among the columns with a bound
    of at least 0, `(0.0, -1)` when none scores above 0; and the pairs it scored exactly (flat
    indexes into `bound`, each once).

    The bound (`_bounds`) is at least every pair's true score less a float32 rounding. Per row,
    the exact score s of the pair with the highest bound is a floor for its best, so only pairs
    with bound >= s (less a margin for that rounding) can beat or tie it; those get the exact
    LCS and rouge_score's float formula, which decides among exact ties (it may differ between
    them in the last bit), then the earliest column wins, as the sequential scan's strict `>`
    keeps it.
    """
    if bound.shape[1] == 0:
        return [(0.0, -1)] * len(rows), np.zeros(0, dtype=np.int64)
    top = bound.argmax(axis=1)
    floor = _scores(seq_array, seq_array, rows, top, lengths, lengths)
    level = np.maximum(floor - _BOUND_MARGIN, _BOUND_MARGIN)  # a score of 0 is never reported
    # flatnonzero, then divmod: numpy's 2-D nonzero was six times slower on this matrix.
    r, c = np.divmod(np.flatnonzero(bound >= level[:, None].astype(np.float32)), bound.shape[1])
    r, c, f1 = _score_by_bound(seq_array, lengths, rows, r, c, bound[r, c], floor)
    order = np.lexsort((c, -f1, r))
    first = order[np.concatenate([[True], r[order][1:] != r[order][:-1]])] if len(r) else order
    out = [(0.0, -1)] * len(rows)
    for k, score, j in zip(r[first].tolist(), f1[first].tolist(), c[first].tolist()):
        if score > 0:
            out[k] = (score, j)
    return out, r * bound.shape[1] + c  # a row's top pair is among them unless it scores 0


def _score_by_bound(seq_array: np.ndarray, lengths: np.ndarray, rows: np.ndarray, r: np.ndarray, c: np.ndarray,
                    bound: np.ndarray, floor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact scores of the candidate pairs (rows[r], c) (r ascending) that can still tie or beat their
    row's floor: `(r, c, f1)` of those scored, highest bounds first.

    Each round scores every row's highest-bound pairs and raises the floor to what they
    score; a pair whose bound has fallen below its row's floor is dropped unscored. A few
    rounds suffice: the rest is scored at once.
    """
    done: list[tuple[np.ndarray, ...]] = []
    for _ in range(_BOUND_ROUNDS):
        if not len(r):
            break
        starts = np.flatnonzero(np.append(True, r[1:] != r[:-1]))
        best_bound = np.repeat(np.maximum.reduceat(bound, starts), np.diff(np.append(starts, len(r))))
        now = bound >= best_bound - _BOUND_MARGIN
        f1 = _scores(seq_array, seq_array, rows[r[now]], c[now], lengths, lengths)
        np.maximum.at(floor, r[now], f1)
        done.append((r[now], c[now], f1))
        later = ~now & (bound >= floor[r] - _BOUND_MARGIN)
        r, c, bound = r[later], c[later], bound[later]
    if len(r):
        done.append((r, c, _scores(seq_array, seq_array, rows[r], c, lengths, lengths)))
    return tuple(np.concatenate(parts) for parts in zip(*done)) if done else (r, c, np.zeros(0))
