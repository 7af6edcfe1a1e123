"""Pure memorization metrics: numpy in, numbers out (DESIGN.md §2)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "BUCKET_NAMES",
    "bucket_of_count",
    "edit_similarity",
    "exposure",
    "exposure_extrapolated",
    "exposure_rank",
    "levenshtein",
    "match_count",
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
    return (match_count(g, t) / g.shape[1]).astype(np.float32)


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


def match_count(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Number of positions where generated == target, per row. int64 [N]."""
    g, t = _pair(generated, target)
    return (g == t).sum(axis=1).astype(np.int64)


def bucket_of_count(count: np.ndarray, m: int, exact: np.ndarray | None = None) -> np.ndarray:
    """Bucket index into BUCKET_NAMES per row, from the integer number of matching positions c of m. int64 [N].

    Chen et al.'s intervals [0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1) are ceil(5 c / m) - 1 (c = 0 in the
    first), computed in integers so that a ratio on an edge (4/20) lands in the bucket it closes; exact rows
    (c == m where `exact` is not given) are bucket 5.
    """
    c = np.asarray(count, dtype=np.int64)
    if m < 1:
        raise ValueError(f"m must be >= 1; got {m}")
    is_exact = c >= m if exact is None else np.asarray(exact, dtype=bool)
    idx = np.clip(-((-5 * c) // m) - 1, 0, 4)  # ceil(5c/m) - 1 by integer floor division
    return np.where(is_exact, 5, idx).astype(np.int64)


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


# --- exposure (Carlini et al. 2019, "The Secret Sharer"; tensorflow_privacy's secret_sharer is the reference) ------


def _finite(values: np.ndarray | Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]


def exposure_rank(secret_nll: float, reference_nlls: np.ndarray | Sequence[float]) -> float:
    """log2 R - log2 rank, in bits, rank = 1 + the number of the R references whose log-perplexity is <= the
    secret's (a tie ranks the reference first, as tensorflow_privacy's compute_exposure_interpolation does when the
    reference sorts first; not capped at R, so a secret no better than any reference has exposure <= 0)."""
    refs = _finite(reference_nlls)
    if not len(refs) or not np.isfinite(secret_nll):
        return math.nan
    rank = 1 + int((refs <= secret_nll).sum())
    return float(np.log2(len(refs)) - np.log2(rank))


def exposure_extrapolated(secret_nll: float, reference_nlls: np.ndarray | Sequence[float]) -> float:
    """-log2 F(secret) in bits, F the skew-normal fitted to the references by maximum likelihood
    (scipy.stats.skewnorm.fit, as tensorflow_privacy's compute_exposure_extrapolation), evaluated in log space
    (skewnorm.logcdf) so far tails stay finite. NaN when the references have no spread (nothing to fit)."""
    from scipy.stats import skewnorm

    refs = _finite(reference_nlls)
    if len(refs) < 3 or not np.isfinite(secret_nll) or np.ptp(refs) <= 1e-12 * max(1.0, abs(refs[0])):
        return math.nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            params = skewnorm.fit(refs)
            logcdf = float(skewnorm.logcdf(float(secret_nll), *params))
        except (ValueError, RuntimeError, FloatingPointError):
            return math.nan
    return -logcdf / math.log(2.0) if math.isfinite(logcdf) else math.nan


def exposure(secret_nll: float, reference_nlls: np.ndarray | Sequence[float]) -> float:
    """Exposure in bits of a secret among R reference secrets of the same format, by log-perplexity: the rank form
    (exposure_rank), and where the secret beats every reference — the rank's ceiling, log2 R — the skew-normal
    extrapolation when it says more (exposure_extrapolated). Both are recorded on their own too."""
    ranked = exposure_rank(secret_nll, reference_nlls)
    refs = _finite(reference_nlls)
    if not math.isfinite(ranked) or (refs <= secret_nll).any():
        return ranked
    extrapolated = exposure_extrapolated(secret_nll, refs)
    return max(ranked, extrapolated) if math.isfinite(extrapolated) else ranked
