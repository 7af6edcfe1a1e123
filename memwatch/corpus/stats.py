"""Per-probe corpus products: n-gram counts along each window, duplicate counts, Kneser-Ney log-probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memwatch.corpus.index import NgramSource

__all__ = [
    "KN_DELTA",
    "KN_EPS",
    "MAX_ORDER",
    "direct_span_counts",
    "kneser_ney_logprobs",
    "ngram_products",
    "window_counts",
]

# n-grams of n = 1..5 are counted at every position, and the corpus language model is a 5-gram: the classic
# Kneser-Ney order, and the n Chen et al. 2024 analyse; longer spans are covered by the duplicate counts.
MAX_ORDER = 5
# tokengrams' interpolated Kneser-Ney (its `get_smoothed_probs`, reproduced here so that one evaluation asks for
# counts of the panel's contexts only instead of a [vocab] distribution per token, ~100 ms each): absolute
# discount 0.5 at every order above the unigram (tokengrams' default), and additive smoothing of 1e-9 on the
# unigram counts so that an unseen token keeps a finite log-probability.
KN_DELTA = 0.5
KN_EPS = 1e-9


def _count_rows(source: NgramSource, rows: np.ndarray) -> np.ndarray:
    """Counts of the distinct rows of rows [Q, n] (int64), each asked once, [Q]."""
    if not len(rows):
        return np.zeros(0, np.int64)
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    counts = np.asarray(source.batch_count(unique.tolist()), dtype=np.int64)
    return counts[inverse.reshape(-1)]


def window_counts(source: NgramSource, tokens: np.ndarray, max_order: int = MAX_ORDER) -> np.ndarray:
    """int64 [N, L, max_order]: column n - 1 at position j is the corpus count of the n-gram tokens[j-n+1 .. j] (the
    n-gram ending at j), -1 where it would start before the window. tokens [N, L].

    An n-gram is asked for only where both (n-1)-grams inside it occur (otherwise it cannot), and each distinct one
    once: held-out text costs little beyond its unigrams."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_rows, length = tokens.shape
    out = np.full((n_rows, length, max_order), -1, np.int64)
    if not n_rows or not length:
        return out
    unigrams = getattr(source, "unigram_counts", None)
    if callable(unigrams):
        table = np.asarray(unigrams(), dtype=np.int64)
        valid = (tokens >= 0) & (tokens < len(table))
        out[:, :, 0] = np.where(valid, table[np.clip(tokens, 0, len(table) - 1)], 0)
    else:
        out[:, :, 0] = _count_rows(source, tokens.reshape(-1, 1)).reshape(n_rows, length)
    for n in range(2, max_order + 1):
        if length < n:
            break
        ends = np.arange(n - 1, length)  # positions where an n-gram ends inside the window
        # The n-gram ending at j holds the (n-1)-grams ending at j and at j - 1.
        possible = (out[:, ends, n - 2] > 0) & (out[:, ends - 1, n - 2] > 0)  # [N, len(ends)]
        col = np.zeros((n_rows, len(ends)), np.int64)
        rows, cols = np.nonzero(possible)
        if len(rows):
            starts = ends[cols] - n + 1
            grams = tokens[rows[:, None], starts[:, None] + np.arange(n)[None, :]]  # [Q, n]
            col[rows, cols] = _count_rows(source, grams)
        out[:, ends, n - 1] = col
    return out


def _span_counts(source: NgramSource, tokens: np.ndarray, possible: np.ndarray) -> np.ndarray:
    """Counts of each row of tokens [N, S] (a whole span), asked only where `possible` [N] (and each distinct once)."""
    out = np.zeros(len(tokens), np.int64)
    rows = np.flatnonzero(possible)
    if len(rows):
        out[rows] = _count_rows(source, np.asarray(tokens)[rows])
    return out


def _distinct(source: NgramSource, contexts: Sequence[Sequence[int]]) -> np.ndarray:
    """N1+(q .) of each context (the number of distinct tokens that follow it), int64 [len]."""
    fast = getattr(source, "distinct_next", None)
    if callable(fast):
        return np.asarray(fast(contexts), dtype=np.int64)
    return np.array([int(np.count_nonzero(v)) for v in source.batch_count_next(contexts)], dtype=np.int64)


def _unigrams(source: NgramSource) -> np.ndarray:
    """int64 [vocab]: every id's count (the source's table when it keeps one, else count_next of the empty query)."""
    table = getattr(source, "unigram_counts", None)
    return np.asarray(table() if callable(table) else source.count_next([]), dtype=np.int64)


def kneser_ney_logprobs(
    source: NgramSource,
    tokens: np.ndarray,
    counts: np.ndarray,
    k: int,
    m: int,
    order: int = MAX_ORDER,
    delta: float = KN_DELTA,
) -> np.ndarray:
    """float64 [N, m]: the log-probability (nats) of each suffix token tokens[:, k + i] given the up to order - 1
    tokens before it, under the corpus's interpolated Kneser-Ney model as tokengrams defines it:

        P_add(w) = (c(w) + eps) / (T + eps V)
        P_0(w)   = max(c(w) - d1, 0) / T + d1 N1+(.) / T P_add(w),   d1 = n1 / (n1 + 2 n2) of the unigram counts
        P_l(w|q) = max(c(q w) - delta, 0) / c(q) + delta N1+(q .) / c(q) P_{l-1}(w | q without its first token)

    (P_l = P_{l-1} where c(q) = 0), with T the tokens indexed, V the vocabulary (separator included), N1+ the number
    of distinct tokens seen after the context. It equals tokengrams' get_smoothed_probs(context)[w] except where
    the unigram counts have no singleton or no doubleton (d1 = 1), where tokengrams' interpolation weight exceeds 1
    and this one stays d1 N1+(.) / T (a normalised distribution).
    counts: window_counts(source, tokens) [N, k + m, >= order], which holds every c(q w) and c(q) needed: only
    N1+(q .) is asked of the index, once per distinct context that occurs at least twice (once: N1+ = 1)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_rows = tokens.shape[0]
    total = int(source.total())
    vocab = int(source.vocab)
    cols = np.arange(k, k + m)  # suffix positions
    c1 = np.maximum(counts[:, cols, 0], 0).astype(np.float64)
    unigrams = _unigrams(source)
    prob = (c1 + KN_EPS) / (total + KN_EPS * vocab)
    if total > 0:
        # The unigram level is discounted too, by Chen & Goodman's estimate n1 / (n1 + 2 n2) from the unigram
        # count-of-counts (1 where either is zero), as tokengrams does.
        n1, n2 = int(np.sum(unigrams == 1)), int(np.sum(unigrams == 2))
        d1 = n1 / (n1 + 2 * n2) if n1 and n2 else 1.0
        prob = np.maximum(c1 - d1, 0.0) / total + d1 * int(np.count_nonzero(unigrams)) / total * prob
    for level in range(1, order):
        # Context q: the `level` tokens before position j, i.e. the level-gram ending at j - 1; w after it.
        usable = cols - level >= 0  # [m]: the window holds the whole context
        if not usable.any():
            break
        c_q = np.where(usable[None, :], counts[:, np.maximum(cols - 1, 0), level - 1], 0)  # [N, m]
        c_qw = np.where(usable[None, :], counts[:, cols, level], 0)
        seen = c_q > 0
        distinct = np.where(c_q == 1, 1, 0).astype(np.float64)
        several = np.argwhere(c_q >= 2)
        if len(several):
            starts = cols[several[:, 1]] - level
            contexts = tokens[several[:, 0][:, None], starts[:, None] + np.arange(level)[None, :]]
            unique, inverse = np.unique(contexts, axis=0, return_inverse=True)
            values = _distinct(source, unique.tolist())
            distinct[several[:, 0], several[:, 1]] = values[inverse.reshape(-1)]
        safe = np.where(seen, c_q, 1).astype(np.float64)
        higher = np.maximum(c_qw - delta, 0.0) / safe + delta * distinct / safe * prob
        prob = np.where(seen, higher, prob)
    with np.errstate(divide="ignore"):
        return np.log(prob) if n_rows else np.zeros((0, m))


def direct_span_counts(
    source: NgramSource, tokens: np.ndarray, k: int, m: int, max_order: int = MAX_ORDER
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window_counts [N, k + m, max_order], occurrences of each whole window [N], of each suffix [N]), asked of the
    source directly. A span occurs only where every max_order-gram inside it does (spans shorter than that: every
    unigram), so held-out windows cost nothing beyond their n-grams."""
    tokens = np.asarray(tokens, dtype=np.int64)[:, : k + m]
    counts = window_counts(source, tokens, max_order)
    top = counts[:, :, max_order - 1]
    inner = top[:, max_order - 1 :] if k + m >= max_order else counts[:, :, 0]
    suffix_inner = (
        top[:, k + max_order - 1 :] if m >= max_order else counts[:, k:, 0]
    )  # n-grams inside it only
    window = _span_counts(source, tokens, (inner > 0).all(axis=1))
    suffix = _span_counts(source, tokens[:, k:], (suffix_inner > 0).all(axis=1))
    return counts, window, suffix


def ngram_products(
    source: NgramSource, tokens: np.ndarray, k: int, m: int, max_order: int = MAX_ORDER
) -> dict[str, Any]:
    """The corpus products of one panel (signals/ngrams.py reads them), tokens [N, k + m]:

    ngram_counts int64 [N, k + m, max_order] (window_counts), ngram_window_count [N] (occurrences of the whole
    window), ngram_suffix_count [N] (of the m suffix tokens), ngram_logprobs float64 [N, m] (Kneser-Ney, above),
    ngram_tokens (tokens indexed, separators included). A source with `span_counts` (CorpusIndex: per shard,
    kept) gives the counts itself."""
    tokens = np.asarray(tokens, dtype=np.int64)[:, : k + m]
    spans = getattr(source, "span_counts", None)
    if callable(spans):
        counts, window, suffix = spans(tokens, k, m, max_order)
    else:
        counts, window, suffix = direct_span_counts(source, tokens, k, m, max_order)
    logprobs = kneser_ney_logprobs(source, tokens, counts, k, m, max_order)
    return {
        "ngram_counts": counts,
        "ngram_window_count": window,
        "ngram_suffix_count": suffix,
        "ngram_logprobs": logprobs,
        "ngram_tokens": int(source.total()),
    }
