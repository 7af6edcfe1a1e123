"""Match buckets (Chen et al. 2024) from integer match counts, their counts per group, and transition matrices."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.signals.registry import GroupStat, Scope, Signal, register_group_stat, register_signal

__all__ = ["BUCKET_NAMES", "bucket_of_count", "bucket_signal", "transition_matrix"]

# Chen et al. 2024 buckets: match_ratio in [0,.2], (.2,.4], (.4,.6], (.6,.8], (.8,1) and exact (1.0) apart.
BUCKET_NAMES: tuple[str, ...] = ("0-20", "20-40", "40-60", "60-80", "80-99", "exact")


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


def transition_matrix(
    prev_buckets: np.ndarray, cur_buckets: np.ndarray, n_buckets: int = len(BUCKET_NAMES)
) -> np.ndarray:
    """Counts [from, to] of probes moving between buckets at two evaluations. int64 [B, B]."""
    prev = np.asarray(prev_buckets, dtype=np.int64)
    cur = np.asarray(cur_buckets, dtype=np.int64)
    out = np.zeros((n_buckets, n_buckets), dtype=np.int64)
    np.add.at(out, (prev, cur), 1)
    return out


def bucket_signal(mode: str) -> str:
    """The bucket signal of a mode: match-count buckets ("bucket") need free decoding; mode "exact" has the prefix
    match length only, a lower bound of the match count, and its buckets carry their own name ("prefix_bucket")."""
    return "bucket" if mode == "full" else "prefix_bucket"


register_signal(
    Signal(
        "bucket",
        "match bucket: ceil(5 c / m) - 1 of the match count c (0-20 ... 80-99), 5 for exact",
        "bucket",
        lambda ctx: bucket_of_count(ctx.values["match_count"], ctx.m, ctx.values["exact"]),
        after=("match_count", "exact"),
        modes=("full",),
        stored=False,
    )
)
register_signal(
    Signal(
        "prefix_bucket",
        "bucket of the prefix match length (mode exact: no match count without free decoding)",
        "bucket",
        lambda ctx: bucket_of_count(ctx.values["prefix_match_len"], ctx.m, ctx.values["exact"]),
        after=("prefix_match_len", "exact"),
        modes=("exact",),
        stored=False,
    )
)


def _counts(name: str) -> Any:
    def compute(ctx: Any, scope: Scope) -> dict[str, Any]:
        buckets = np.asarray(ctx.values[name])[scope.rows]
        counts = np.bincount(buckets, minlength=len(BUCKET_NAMES))
        return {f"{name}/{b}": float(c) for b, c in zip(BUCKET_NAMES, counts.tolist(), strict=True)}

    return compute


def _transitions(name: str) -> Any:
    def compute(ctx: Any, scope: Scope) -> dict[str, Any]:
        prev = ctx.previous.get(name)
        if prev is None:
            return {}
        cur = np.asarray(ctx.values[name])
        return {"transitions": transition_matrix(prev[scope.rows], cur[scope.rows])}

    return compute


for _mode, _name in (("full", "bucket"), ("exact", "prefix_bucket")):
    register_group_stat(
        GroupStat(
            f"{_name}/<bucket>",
            f"probes per {_name.replace('_', ' ')} (0-20, 20-40, 40-60, 60-80, 80-99, exact)",
            "probes",
            _counts(_name),
            after=(_name,),
            modes=(_mode,),
        )
    )
register_group_stat(
    GroupStat(
        "transitions",
        "bucket transition matrix [from, to] since the previous evaluation",
        "probes",
        lambda ctx, scope: _transitions(bucket_signal(ctx.mode))(ctx, scope),
        kind="matrix",
    )
)
