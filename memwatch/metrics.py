"""Pure memorization metrics: numpy in, numbers out (DESIGN.md §2)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "BUCKET_NAMES",
    "bucket_of",
    "edit_similarity",
    "levenshtein",
    "match_ratio",
    "prefix_match_len",
]

# Chen et al. 2024 buckets: match_ratio in [0,.2], (.2,.4], (.4,.6], (.6,.8], (.8,1) and exact (1.0) apart.
BUCKET_NAMES: tuple[str, ...] = ("0-20", "20-40", "40-60", "60-80", "80-99", "exact")


def _pair(generated: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(generated)
    t = np.asarray(target)
    if g.ndim != 2 or g.shape != t.shape:
        raise ValueError(f"expected two [N, m] arrays of the same shape, got {g.shape} and {t.shape}")
    return g, t


def prefix_match_len(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Number of leading positions where generated == target, per row. int64 [N]."""
    g, t = _pair(generated, target)
    eq = g == t  # [N, m]
    # argmin finds the first False; rows that are all True have no False and get m.
    first_miss = np.argmin(eq, axis=1)
    return np.where(eq.all(axis=1), g.shape[1], first_miss).astype(np.int64)


def match_ratio(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Fraction of positions where generated == target (Biderman et al. 2023). float32 [N]."""
    g, t = _pair(generated, target)
    if g.shape[1] == 0:
        return np.ones(g.shape[0], dtype=np.float32)
    return (g == t).mean(axis=1).astype(np.float32)


def levenshtein(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Token-level Levenshtein distance between the rows of a [N, p] and b [N, q]. int64 [N].

    Row-vectorized Wagner-Fischer: each DP row costs a few numpy ops, using
    D[i, j] = j + cummin_{l<=j}(C[l] - l) for the insertion chain.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected [N, p] and [N, q] arrays, got {a.shape} and {b.shape}")
    n, p = a.shape
    q = b.shape[1]
    cols = np.arange(q + 1, dtype=np.int64)
    prev = np.broadcast_to(cols, (n, q + 1)).copy()
    for i in range(1, p + 1):
        c = np.empty_like(prev)
        c[:, 0] = i
        substitute = prev[:, :-1] + (a[:, i - 1 : i] != b)
        c[:, 1:] = np.minimum(prev[:, 1:] + 1, substitute)
        prev = cols + np.minimum.accumulate(c - cols, axis=1)
    return prev[:, q].copy()


def edit_similarity(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1 - Levenshtein(generated, target) / m over tokens (Ippolito et al. 2022). float32 [N]."""
    g, t = _pair(generated, target)
    m = g.shape[1]
    if m == 0:
        return np.ones(g.shape[0], dtype=np.float32)
    out = np.ones(g.shape[0], dtype=np.float32)
    differ = ~(g == t).all(axis=1)  # identical rows have distance 0: skip the DP for them
    if differ.any():
        out[differ] = 1.0 - levenshtein(g[differ], t[differ]) / m
    return out


def bucket_of(match_ratio: np.ndarray, exact: np.ndarray | None = None) -> np.ndarray:
    """Bucket index into BUCKET_NAMES per row. int64 [N].

    Exact rows (or match_ratio == 1 where `exact` is not given) are bucket 5; otherwise the Chen et al.
    intervals [0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1).
    """
    r = np.asarray(match_ratio, dtype=np.float64)
    is_exact = r >= 1.0 if exact is None else np.asarray(exact, dtype=bool)
    # ceil(r / .2) - 1 maps (0,.2]->0, (.2,.4]->1, ...; r == 0 -> 0. A small tolerance keeps 0.4 in (.2, .4].
    idx = np.clip(np.ceil(r / 0.2 - 1e-9) - 1, 0, 4).astype(np.int64)
    return np.where(is_exact, 5, idx)


def memorized(match_ratio: np.ndarray | None, exact: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Which rows count as memorized: exact, or match_ratio >= threshold when threshold < 1. bool [N]."""
    exact = np.asarray(exact, dtype=bool)
    if threshold >= 1.0 or match_ratio is None:
        return exact.copy()
    return exact | (np.asarray(match_ratio) >= threshold)


def transition_matrix(
    prev_buckets: np.ndarray, cur_buckets: np.ndarray, n_buckets: int = len(BUCKET_NAMES)
) -> np.ndarray:
    """Counts [from, to] of probes moving between buckets at two evaluations. int64 [B, B]."""
    prev = np.asarray(prev_buckets, dtype=np.int64)
    cur = np.asarray(cur_buckets, dtype=np.int64)
    out = np.zeros((n_buckets, n_buckets), dtype=np.int64)
    np.add.at(out, (prev, cur), 1)
    return out


def memorization_events(
    prev_memorized: np.ndarray | None, cur_memorized: np.ndarray, ever_memorized: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-probe events between two evaluations (Tirumala et al. 2022 forgetting; re-memorization).

    newly: memorized now, not before (includes re-memorized); first: memorized now for the first time ever;
    rememorized: memorized now, not before, but memorized at some earlier evaluation; forgotten: memorized
    before, not now. `ever_memorized` is the state *before* this evaluation. bool [N] each.
    """
    cur = np.asarray(cur_memorized, dtype=bool)
    ever = np.asarray(ever_memorized, dtype=bool)
    prev = np.zeros_like(cur) if prev_memorized is None else np.asarray(prev_memorized, dtype=bool)
    newly = cur & ~prev
    return {
        "newly": newly,
        "first": cur & ~ever,
        "rememorized": newly & ever,
        "forgotten": prev & ~cur,
    }


def entropy_profiles(entropy: np.ndarray, buckets: np.ndarray) -> dict[int, np.ndarray]:
    """Mean entropy profile [w + m] per bucket index present (Chen et al. boundary effect)."""
    entropy = np.asarray(entropy, dtype=np.float64)
    buckets = np.asarray(buckets)
    return {int(b): entropy[buckets == b].mean(axis=0) for b in np.unique(buckets)}


def boundary_stats(profile: np.ndarray, entropy_window: int, width: int) -> tuple[float, float, float]:
    """(pre, post, jump) of a mean entropy profile [w + m]: mean over the last j prefix positions, mean over the
    first j generated positions (j = width, capped at w and m), and post - pre. NaN where w == 0."""
    profile = np.asarray(profile, dtype=np.float64)
    w = entropy_window
    m = profile.shape[-1] - w
    j = min(width, w, m)
    if j <= 0:
        return float("nan"), float("nan"), float("nan")
    pre = float(profile[w - j : w].mean())
    post = float(profile[w : w + j].mean())
    return pre, post, post - pre
