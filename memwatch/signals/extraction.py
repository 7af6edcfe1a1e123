"""Verbatim extraction signals: exact, match count and ratio, prefix match, edit similarity, suffix NLL, memorized."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.signals.registry import Aggregate, GroupStat, Signal, register_group_stat, register_signal

__all__ = [
    "edit_similarity",
    "levenshtein",
    "match_count",
    "match_ratio",
    "memorized",
    "prefix_match_len",
]


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


def match_count(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Number of positions where generated == target, per row. int64 [N]."""
    g, t = _pair(generated, target)
    return (g == t).sum(axis=1).astype(np.int64)


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


def memorized(count: np.ndarray | None, m: int, exact: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Which rows count as memorized: exact, or at least `threshold` of the m suffix tokens reproduced when
    threshold < 1, decided in integers (c >= ceil(threshold m)) so that c / m == threshold counts. bool [N]."""
    exact = np.asarray(exact, dtype=bool)
    if threshold >= 1.0 or count is None:
        return exact.copy()
    need = int(np.ceil(threshold * m - 1e-9))  # the float product's rounding never moves an integer boundary
    return exact | (np.asarray(count) >= need)


# --- the signals ------------------------------------------------------------------------------------------------


def _product(name: str) -> Any:
    def compute(ctx: Any) -> np.ndarray:
        return np.asarray(ctx.products[name])

    compute.__name__ = f"product_{name}"
    return compute


register_signal(
    Signal(
        "exact",
        "the greedy continuation of the first k tokens equals the true next m tokens (k-extractable)",
        "bool",
        _product("exact"),
        direction=1,
        needs=frozenset({"exact"}),
        aggregates=(
            Aggregate(
                "extraction_rate",
                "rate",
                ("group", "tier", "twins"),
                meaning="share of the probes extracted exactly",
                label="extraction rate",
                fmt=".1%",
                tracked=True,
            ),
            Aggregate(
                "extracted", "sum", ("group", "tier", "twins"), headline=False, meaning="probes extracted"
            ),
        ),
    )
)
register_signal(
    Signal(
        "match_ratio",
        "fraction of the m suffix positions the greedy continuation reproduces (Pythia's memorization score)",
        "ratio",
        _product("match_ratio"),
        direction=1,
        needs=frozenset({"generated"}),
        modes=("full",),
        aggregates=(
            Aggregate(
                "mean_match_ratio", "mean", ("group", "tier"), meaning="mean match ratio", label="match ratio"
            ),
        ),
        histogram=True,
    )
)


def _match_count(ctx: Any) -> np.ndarray:
    count = ctx.products.get("match_count")
    if count is not None:
        return np.asarray(count, dtype=np.int64)
    # A replayed history keeps the ratio c / m: float32 c / m times m rounds back to c for any m.
    return np.rint(np.asarray(ctx.values["match_ratio"], dtype=np.float64) * ctx.m).astype(np.int64)


register_signal(
    Signal(
        "match_count",
        "suffix positions the greedy continuation reproduces (the integer behind match_ratio and the buckets)",
        "tokens",
        _match_count,
        direction=1,
        after=("match_ratio",),
        modes=("full",),
        stored=False,
    )
)
register_signal(
    Signal(
        "prefix_match_len",
        "leading suffix tokens the greedy continuation reproduces before its first miss",
        "tokens",
        _product("prefix_match_len"),
        direction=1,
        needs=frozenset({"prefix_match_len"}),
        aggregates=(Aggregate("mean_prefix_match_len", "mean", headline=False, meaning="mean prefix match"),),
    )
)
register_signal(
    Signal(
        "edit_similarity",
        "1 - token Levenshtein distance between continuation and suffix / m (approximate memorization)",
        "ratio",
        _product("edit_similarity"),
        direction=1,
        needs=frozenset({"generated"}),
        modes=("full",),
        aggregates=(
            Aggregate("mean_edit_similarity", "mean", meaning="mean edit similarity", label="edit sim"),
        ),
    )
)
register_signal(
    Signal(
        "suffix_nll",
        "mean negative log-likelihood of the true suffix given the true prefix (teacher forcing)",
        "nats/token",
        _product("suffix_nll"),
        direction=-1,
        needs=frozenset({"suffix_nll"}),
        membership=True,  # the suffix's loss: for a canary, the loss of its secret alone
        aggregates=(
            Aggregate(
                "mean_suffix_nll",
                "mean",
                meaning="mean suffix NLL (nats/token)",
                label="suffix NLL",
                tracked=True,
            ),
        ),
    )
)
register_signal(
    Signal(
        "near_tie",
        "a greedy step up to the end had a top-1/top-2 logit margin within the compute dtype's resolution",
        "bool",
        _product("near_tie"),
        needs=frozenset({"near_tie"}),
        aggregates=(Aggregate("near_ties", "sum", headline=False, meaning="probes with a near tie"),),
    )
)


def _memorized(ctx: Any) -> np.ndarray:
    count = ctx.values.get("match_count")
    return memorized(count, ctx.m, ctx.values["exact"], float(ctx.settings.get("memorized_threshold", 1.0)))


register_signal(
    Signal(
        "memorized",
        "memorized: exact, or at least memorized_threshold of the suffix reproduced",
        "bool",
        _memorized,
        direction=1,
        after=("exact", "match_count"),
        stored=False,
        aggregates=(
            Aggregate(
                "memorized_rate",
                "rate",
                meaning="share counted as memorized",
                label="memorized",
                fmt=".1%",
                tracked=True,
            ),
            Aggregate("memorized", "sum", headline=False, meaning="probes counted as memorized"),
        ),
    )
)


def _sizes(ctx: Any, scope: Any) -> dict[str, float]:
    """How many probes a scope holds: the group; a tier's inserted canaries and its twins; a pair's two sides."""
    out = {"n": float(len(scope.rows))}
    if scope.control is not None:
        out["twins_n" if scope.kind == "tier" else "control_n"] = float(len(scope.control))
    return out


register_group_stat(
    GroupStat(
        "n",
        "probes in the scope",
        "probes",
        _sizes,
        scopes=("group", "tier", "pair"),
        outputs=(
            ("n", "scalar", "probes in the group (a tier: its inserted canaries; a pair: its members)"),
            ("twins_n", "scalar", "a tier's never-inserted twins"),
            ("control_n", "scalar", "a pair's control probes"),
        ),
    )
)


def _suffix_distinct(ctx: Any) -> np.ndarray:
    suffix = np.asarray(ctx.tokens)[:, ctx.k : ctx.k + ctx.m]  # [N, m]
    if not len(suffix):
        return np.zeros(0, np.int64)
    s = np.sort(suffix, axis=1)
    return 1 + (np.diff(s, axis=1) != 0).sum(axis=1)


register_signal(
    Signal(
        "suffix_distinct",
        "distinct tokens in the true suffix: fewer than a few is predictable text (a run of spaces, a '=====' rule)",
        "tokens",
        _suffix_distinct,
        stored=False,
    )
)
