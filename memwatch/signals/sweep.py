"""The live context/continuation sweep: exact-extraction rate at each (prefix length, continuation length) pair."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.signals.registry import GroupStat, Scope, register_group_stat

__all__ = ["sweep_rates"]


def sweep_rates(
    prefix_match_len: np.ndarray, prefix_lens: tuple[int, ...], suffix_lens: tuple[int, ...]
) -> dict[str, float]:
    """{"sweep_rate/k<k>_m<m>": share of rows exactly extracted with the last k prefix tokens over the first m
    continuation tokens}: prefix_match_len [N, len(prefix_lens)], the leading greedy tokens equal to the truth.
    Greedy decoding is deterministic, so the first m tokens of a longer greedy continuation are the m-token one:
    exact at m iff the prefix match is at least m."""
    pml = np.asarray(prefix_match_len)
    if not len(pml):
        return {}
    return {
        f"sweep_rate/k{k}_m{m}": float(np.mean(pml[:, i] >= m))
        for i, k in enumerate(prefix_lens)
        for m in suffix_lens
    }


def _compute(ctx: Any, scope: Scope) -> dict[str, Any]:
    pml = ctx.products.get("sweep_prefix_match_len")
    lens = ctx.settings.get("sweep")
    if pml is None or not lens or not len(scope.rows):
        return {}
    prefix_lens, suffix_lens = lens
    return sweep_rates(np.asarray(pml)[scope.rows], tuple(prefix_lens), tuple(suffix_lens))


register_group_stat(
    GroupStat(
        "sweep/<k>_<m>",
        "the live sweep over context and continuation size (Chen et al. 2024; MonitorConfig.sweep_prefix_lens, "
        "sweep_suffix_lens): the scope's exact-extraction rate given the last k prefix tokens, judged over the "
        "first m continuation tokens",
        "rate",
        _compute,
        outputs=(
            ("sweep_rate/k<k>_m<m>", "scalar", "exact-extraction rate at prefix length k, continuation m"),
        ),
        kept=True,  # from per-length prefix matches the history does not store: it keeps these numbers
    )
)
