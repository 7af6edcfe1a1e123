"""Pure memorization metrics: numpy in, numbers out (DESIGN.md §2)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "BUCKET_NAMES",
    "bucket_of_count",
    "edit_similarity",
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


# --- exposure (Carlini et al. 2019, "The Secret Sharer") ------------------------------------------------------

_LOG_SQRT_2PI = 0.5 * np.log(2 * np.pi)


def log_ndtr(z: np.ndarray | float) -> np.ndarray:
    """log Phi(z), accurate far into the left tail (asymptotic series below z = -8). float64, shape of z."""
    import math

    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    mid = z > -8
    out[mid] = np.log(0.5 * np.vectorize(math.erfc, otypes=[float])(-z[mid] / np.sqrt(2.0)))
    t = z[~mid]
    series = 1 - 1 / t**2 + 3 / t**4 - 15 / t**6 + 105 / t**8
    out[~mid] = -0.5 * t**2 - _LOG_SQRT_2PI - np.log(-t) + np.log(series)
    return out


def skewnormal_fit(samples: np.ndarray) -> tuple[float, float, float]:
    """(location xi, scale omega, shape alpha) of a skew-normal by the method of moments.

    The sample skewness is clipped to +-0.99 (a skew-normal cannot be more skewed than ~0.995).
    """
    x = np.asarray(samples, dtype=np.float64)
    mu, sd = float(x.mean()), float(x.std())
    if sd == 0:
        return mu, 1e-12, 0.0
    g1 = float(np.clip(np.mean((x - mu) ** 3) / sd**3, -0.99, 0.99))
    if abs(g1) < 1e-9:  # rounding-level skew: the cube root below would turn it into a visible shape
        g1 = 0.0
    a = abs(g1) ** (2 / 3)
    delta = np.sign(g1) * np.sqrt((np.pi / 2) * a / (a + ((4 - np.pi) / 2) ** (2 / 3)))
    alpha = float(delta / np.sqrt(1 - delta**2))
    omega = sd / np.sqrt(1 - 2 * delta**2 / np.pi)
    xi = mu - omega * delta * np.sqrt(2 / np.pi)
    return float(xi), float(omega), alpha


def skewnormal_logcdf(x: float, xi: float, omega: float, alpha: float) -> float:
    """log P(X <= x) for a skew-normal, by log-space quadrature of its density (no scipy).

    The density 2 phi(z) Phi(alpha z) / omega is integrated over z up to (x - xi) / omega. In the left tail the
    integrand decreases leftwards, so a window where it falls by e^-60 holds all the mass; elsewhere the window
    starts at z = -40, where the mass left out is below 2 Phi(-40).
    """
    zx = (x - xi) / omega
    if zx < -5:
        span = max(0.05, float(np.sqrt(zx**2 + 120) - abs(zx)))
        lo = zx - span
    else:
        lo = -40.0
    z = np.linspace(lo, zx, 20001)
    logf = np.log(2.0) - 0.5 * z**2 - _LOG_SQRT_2PI + log_ndtr(alpha * z)
    # trapezoid in log space: log sum(w_i f_i) with w = dz * (1/2, 1, ..., 1, 1/2)
    logw = np.full_like(z, np.log(z[1] - z[0]))
    logw[[0, -1]] += np.log(0.5)
    s = logf + logw
    top = s.max()
    return float(top + np.log(np.exp(s - top).sum()))


def exposure(secret_nll: float, reference_nlls: np.ndarray) -> float:
    """Exposure in bits of a secret among R reference secrets of the same format, by log-perplexity.

    exposure = log2 R - log2 rank, rank = 1 + the number of references with a lower log-perplexity (capped at
    R). A secret that beats every reference would be capped at log2 R; there the skew-normal fitted to the
    references (method of moments) extrapolates: exposure = -log2 P(X <= secret), at least log2 R.
    """
    refs = np.asarray(reference_nlls, dtype=np.float64)
    refs = refs[np.isfinite(refs)]
    r = len(refs)
    if r == 0 or not np.isfinite(secret_nll):
        return float("nan")
    rank = min(r, 1 + int((refs < secret_nll).sum()))
    bound = float(np.log2(r) - np.log2(rank))
    if rank > 1 or (refs < secret_nll).any():
        return bound
    xi, omega, alpha = skewnormal_fit(refs)
    if omega <= 1e-12:
        return bound
    extrapolated = -skewnormal_logcdf(float(secret_nll), xi, omega, alpha) / np.log(2.0)
    return float(max(bound, extrapolated))
