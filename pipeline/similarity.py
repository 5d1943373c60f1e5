"""ROUGE-L similarity for near-duplicate search: tokenizers, exact ROUGE-L F1, and a pruning index.

Used by `python -m pipeline filter` (the near-duplicate filter), by `generate` online (add what
was kept, query a batch), by `mix` (dedup across sources) and by `eval` (the tokenizer).

- `tokenize(text, "rouge")` gives exactly rouge_score's default tokens (lowercase, every run of
  `[^a-z0-9]` is a separator, no stemming). `tokenize(text, "multilingual")` gives the same
  tokens on ASCII text; on other text it applies NFKC and lowercase, makes each kana, kanji and
  hangul character one token (those scripts have no spaces) and splits everything else into
  runs of letters, digits and combining marks.
- `rouge_l(a, b)` is ROUGE-L F1 with beta 1, 2*LCS/(m+n), computed from rapidfuzz's LCS with
  rouge_score's own float formula (2pr/(p+r)), so it equals rouge_score's `rougeL` fmeasure bit
  for bit: a tie exactly at the threshold is decided the same way as the reference.
- `RougeIndex`: a pool of token sequences with an inverted index. Each token becomes one
  integer id, stored as one character of a Python string, so rapidfuzz's C++ LCS
  (`process.cpdist` with `Indel.distance`, all cores) compares whole blocks of pairs in one call.

Pruning never changes a decision. A pair (a, b) of lengths m, n can only score above t if
2*min(m,n)/(m+n) > t (length bound) and 2*|bag(a) & bag(b)|/(m+n) > t (an LCS is a common
sub-multiset). The second implies that they share at least alpha(m) = floor(t*m/(2-t)) + 1
tokens, counted with multiplicity, so when every sequence's tokens (the k-th copy of a token
being its own element) are sorted by one global order, rarest first, the two must share an
element among the first m - alpha(m) + 1 of a and the first n - alpha(n) + 1 of b (prefix
filtering, as in AllPairs / PPJoin). Only those prefixes are indexed, so a query touches
postings of rare tokens and the work grows with real near-neighbours, not with the pool squared.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections import Counter
from typing import Callable, Literal

import numpy as np

Tokenizer = Literal["rouge", "multilingual"]
TOKENIZERS: tuple[str, ...] = ("rouge", "multilingual")

# rouge_score's tokenizer: lowercase, every run of anything but [a-z0-9] separates tokens.
NON_ALNUM_RE = re.compile(r"[^a-z0-9]+")

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


def _multilingual() -> "object":
    global _multilingual_re
    if _multilingual_re is None:
        import regex  # the stdlib `re` has no Unicode script or mark classes

        _multilingual_re = regex.compile(_MULTILINGUAL_PATTERN, regex.V1)
    return _multilingual_re


def tokenize(text: str, tokenizer: str = "multilingual") -> list[str]:
    """Tokens for ROUGE-L. `rouge`: rouge_score's default tokenizer; `multilingual`: see module doc."""
    if tokenizer == "rouge" or (tokenizer == "multilingual" and text.isascii()):
        return NON_ALNUM_RE.sub(" ", text.lower()).split()
    if tokenizer == "multilingual":
        return _multilingual().findall(unicodedata.normalize("NFKC", text).lower())
    raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")


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


def _id_char(token_id: int) -> str:
    return chr(token_id if token_id < _SURROGATES_START else token_id + _SURROGATES_SIZE)


def _char_id(ch: str) -> int:
    code = ord(ch)
    return code if code < _SURROGATES_START else code - _SURROGATES_SIZE


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


class RougeIndex:
    """A growing pool of texts, searchable for the highest ROUGE-L F1 against it.

    `best_matches(texts)` returns, per text, `(score, item_id)`:
    - when some pool member scores above `threshold`, the score is the exact highest ROUGE-L
      F1 against the whole pool and `item_id` the earliest-added member with that score;
    - otherwise `score` is the highest among the pool members the index had to examine (those
      sharing a rare token with it), which is a lower bound of the true highest, and `item_id`
      is the member it came from, whose score is exact; `(0.0, None)` when nothing was examined.

    `add_unless_similar(items)` is the greedy filter: each item is added unless it scores above
    the threshold against the pool, which includes the items of the same call that were added
    before it, exactly as if they were checked one at a time in order.
    """

    def __init__(self, threshold: float = 0.7, tokenizer: str = "multilingual",
                 block_size: int = DEFAULT_BLOCK_SIZE):
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {threshold}")
        self.threshold = threshold
        self.tokenizer = tokenizer
        self.block_size = block_size
        self._vocab: dict[str, str] = {}  # token -> its id as one character
        self._doc_freq: list[int] = []  # per token id: how many pool members contain it
        self._order: list[int] = []  # per token id: sort key of the global order, rarest first
        self._ordered_at = 0  # pool size when `_order` was last counted
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._seqs: list[str] = []
        # The same sequences as a numpy object array (grown by doubling), so a block's pairs
        # are gathered by fancy indexing in C rather than a Python loop.
        self._seq_array = np.empty(DEFAULT_BLOCK_SIZE, dtype=object)
        self._lengths: list[int] = []
        self._positions: dict[str, int] = {}
        self._postings: dict[int, list[int]] = {}
        # Pair counts, for reports: every pair the greedy filter could have compared (each item
        # against the pool before its block and the block's earlier items), and those it verified.
        self.pairs_possible = 0
        self.pairs_compared = 0

    # --- pool --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._positions

    def text_of(self, item_id: str) -> str:
        return self._texts[self._positions[item_id]]

    def ids(self) -> list[str]:
        return list(self._ids)

    def add(self, item_id: str, text: str) -> None:
        """Add one text to the pool, unconditionally."""
        self._add(item_id, text, self.encode(text))

    def prepare_order(self, texts) -> None:
        """Count token frequencies over `texts` (e.g. all candidates of a batch job) to order tokens
        rarest first before anything is added. Optional: it only makes queries cheaper."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(set(tokenize(text, self.tokenizer)))
        for token in counts:
            self._char(token)
        for token, count in counts.items():
            self._doc_freq[_char_id(self._vocab[token])] += count
        self._reorder()
        # The counts above were hints about texts not in the pool, so the order holds until the
        # pool outgrows them; the pool's own counts restart from what it holds.
        self._ordered_at = max(self._ordered_at, len(texts) if hasattr(texts, "__len__") else 0)
        self._doc_freq = [0] * len(self._doc_freq)
        for seq in self._seqs:
            for ch in set(seq):
                self._doc_freq[_char_id(ch)] += 1

    def encode(self, text: str) -> str:
        """The token-id sequence of `text`, one character per token."""
        char = self._char
        return "".join([char(token) for token in tokenize(text, self.tokenizer)])

    def _char(self, token: str) -> str:
        ch = self._vocab.get(token)
        if ch is None:
            token_id = len(self._vocab)
            if token_id >= MAX_VOCAB:
                raise ValueError(f"more than {MAX_VOCAB:,} distinct tokens; the index cannot hold more")
            ch = self._vocab[token] = _id_char(token_id)
            self._doc_freq.append(0)
            self._order.append(token_id)  # unseen at the last count: sorts with the rarest
        return ch

    def _add(self, item_id: str, text: str, seq: str) -> None:
        if item_id in self._positions:
            raise ValueError(f"duplicate id {item_id!r} in the ROUGE-L pool")
        position = len(self._ids)
        self._positions[item_id] = position
        self._ids.append(item_id)
        self._texts.append(text)
        self._seqs.append(seq)
        if position == len(self._seq_array):
            grown = np.empty(2 * position, dtype=object)
            grown[:position] = self._seq_array
            self._seq_array = grown
        self._seq_array[position] = seq
        self._lengths.append(len(seq))
        for ch in set(seq):
            self._doc_freq[_char_id(ch)] += 1
        for key in self._prefix(seq):
            self._postings.setdefault(key, []).append(position)
        if len(self._ids) >= max(self._ordered_at, 1) * REORDER_GROWTH:
            self._reorder()

    def _reorder(self) -> None:
        """Re-count the global token order and re-index every prefix under it."""
        stride = len(self._doc_freq) + 1
        self._order = [df * stride + i for i, df in enumerate(self._doc_freq)]
        self._ordered_at = len(self._ids)
        self._postings = {}
        for position, seq in enumerate(self._seqs):
            for key in self._prefix(seq):
                self._postings.setdefault(key, []).append(position)

    def _prefix(self, seq: str) -> list[int]:
        """Element keys of the first m - alpha(m) + 1 elements of `seq` in the global order."""
        m = len(seq)
        if m == 0:
            return []
        size = m - min_shared_tokens(m, self.threshold) + 1
        if size <= 0:
            return []
        order = self._order
        ids = sorted(map(_char_id, seq), key=order.__getitem__)[:size]
        keys, copies = [], {}
        for token_id in ids:  # the k-th copy of a token is its own element
            k = copies.get(token_id, 0)
            copies[token_id] = k + 1
            keys.append(token_id + k * _COPY_STRIDE)
        return keys

    # --- search ------------------------------------------------------------------------

    def _pool_candidates(self, seq: str, keys: list[int], lengths: np.ndarray) -> np.ndarray:
        """Pool positions that pass the prefix and length bounds for `seq`, ascending."""
        postings = self._postings
        lists = [postings[k] for k in keys if k in postings]
        total = sum(map(len, lists))
        if not total:
            return np.empty(0, dtype=np.int64)
        found = np.unique(np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total))
        low, high = length_window(len(seq), self.threshold)
        n = lengths[found]
        return found[(n > low) & (n < high)]

    def _lengths_array(self) -> np.ndarray:
        return np.asarray(self._lengths, dtype=np.int64)

    def best_matches(self, texts: list[str]) -> list[tuple[float, str | None]]:
        """Per text, `(highest ROUGE-L F1, pool id)` against the pool; exact above the threshold (class doc)."""
        seqs = [self.encode(text) for text in texts]
        lengths = self._lengths_array()
        pairs_a, pairs_b = [], []
        for i, seq in enumerate(seqs):
            found = self._pool_candidates(seq, self._prefix(seq), lengths)
            pairs_a.append(np.full(len(found), i, dtype=np.int64))
            pairs_b.append(found)
        scores = self._scores(seqs, self._seq_array, pairs_a, pairs_b)
        out = []
        for found, score in zip(pairs_b, scores):
            if len(found) == 0:
                out.append((0.0, None))
                continue
            best = int(np.argmax(score))
            out.append((float(score[best]), self._ids[found[best]]))
        return out

    def _scores(self, queries: list[str], choices, pairs_a: list[np.ndarray],
                pairs_b: list[np.ndarray]) -> list[np.ndarray]:
        """Exact ROUGE-L F1 of every pair (queries[a], choices[b]), in one rapidfuzz call; per query.

        `choices` is a list or an object array of sequences (only the indexed ones are read).
        """
        from rapidfuzz import process
        from rapidfuzz.distance import Indel

        sizes = [len(b) for b in pairs_b]
        if not sum(sizes):
            return [np.empty(0) for _ in sizes]
        a = np.concatenate(pairs_a)
        b = np.concatenate(pairs_b)
        query_arr = np.empty(len(queries), dtype=object)
        query_arr[:] = queries
        if isinstance(choices, np.ndarray):
            chosen = choices[b]
        else:
            chosen = np.empty(len(b), dtype=object)
            chosen[:] = [choices[j] for j in b.tolist()]
        distances = process.cpdist(query_arr[a], chosen, scorer=Indel.distance, dtype=np.int32, workers=-1)
        m = np.fromiter(map(len, queries), dtype=np.int64, count=len(queries))[a]
        n = np.fromiter(map(len, chosen), dtype=np.int64, count=len(chosen))
        scores = _f1_from_lcs((m + n - distances) // 2, m, n)
        return np.split(scores, np.cumsum(sizes)[:-1])

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
        for start in range(0, len(items), self.block_size):
            block = items[start:start + self.block_size]
            results.extend(self._settle_block(block))
            if on_block is not None:
                on_block(len(block))
        return results

    def _settle_block(self, block: list[tuple[str, str]]) -> list[tuple[bool, float, str | None]]:
        seqs = [self.encode(text) for _, text in block]
        lengths = self._lengths_array()
        block_lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        block_postings: dict[int, list[int]] = {}
        pool_b, block_b = [], []
        for i, seq in enumerate(seqs):
            keys = self._prefix(seq)
            pool_b.append(self._pool_candidates(seq, keys, lengths))
            # Earlier items of the same block: the same bounds, on a throwaway index.
            lists = [block_postings[k] for k in keys if k in block_postings]
            if lists:
                found = np.unique(np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64))
                low, high = length_window(len(seq), self.threshold)
                n = block_lengths[found]
                block_b.append(found[(n > low) & (n < high)])
            else:
                block_b.append(np.empty(0, dtype=np.int64))
            for key in keys:
                block_postings.setdefault(key, []).append(i)
        index_a = [np.full(len(b), i, dtype=np.int64) for i, b in enumerate(pool_b)]
        pool_scores = self._scores(seqs, self._seq_array, index_a, pool_b)
        index_a = [np.full(len(b), i, dtype=np.int64) for i, b in enumerate(block_b)]
        block_scores = self._scores(seqs, seqs, index_a, block_b)

        pool_size = len(self._ids)
        added: list[bool] = []
        results = []
        for i, (item_id, text) in enumerate(block):
            self.pairs_possible += pool_size + i  # the pool before the block, and the block so far
            self.pairs_compared += len(pool_b[i]) + len(block_b[i])
            best, best_id = 0.0, None
            if len(pool_b[i]):
                j = int(np.argmax(pool_scores[i]))
                best, best_id = float(pool_scores[i][j]), self._ids[pool_b[i][j]]
            for j, score in zip(block_b[i].tolist(), block_scores[i].tolist()):
                if added[j] and score > best:  # earlier in-block items only count if they were added
                    best, best_id = score, block[j][0]
            keep = best <= self.threshold
            added.append(keep)
            if keep:
                self._add(item_id, text, seqs[i])
            results.append((keep, best, best_id))
        return results

    # --- exact scores for reports -------------------------------------------------------

    def exact_best_earlier(self, positions: list[int], chunk: int = 256) -> list[tuple[float, str | None]]:
        """Exact highest ROUGE-L F1 of pool member `p` against pool members added before it, for each p.

        No pruning: this compares against everything earlier (all cores, C++), so its cost is
        the number of such pairs; the filter stage calls it only when that is affordable.
        """
        from rapidfuzz import process
        from rapidfuzz.distance import Indel

        lengths = self._lengths_array()
        out: list[tuple[float, str | None]] = []
        for start in range(0, len(positions), chunk):
            rows = positions[start:start + chunk]
            end = max(rows)
            if end == 0:
                out.extend((0.0, None) for _ in rows)
                continue
            distances = process.cdist([self._seqs[p] for p in rows], self._seqs[:end], scorer=Indel.distance,
                                      dtype=np.int32, workers=-1)
            m = lengths[rows][:, None]
            n = lengths[:end][None, :]
            scores = _f1_from_lcs((m + n - distances) // 2, m, n)
            scores[np.arange(end)[None, :] >= np.asarray(rows)[:, None]] = -1.0  # later members do not count
            best = scores.argmax(axis=1)
            for row, p, j in zip(scores, rows, best.tolist()):
                out.append((0.0, None) if p == 0 or row[j] <= 0 else (float(row[j]), self._ids[j]))
        return out
