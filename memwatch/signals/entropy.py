"""The entropy profile across the prefix/continuation boundary per bucket, and the boundary jump (Chen et al.)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.signals.buckets import BUCKET_NAMES, bucket_signal
from memwatch.signals.registry import GroupStat, Scope, register_group_stat

__all__ = ["boundary_stats", "entropy_profiles"]


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


def _boundary(prefix: str) -> Any:
    """Per bucket of the scope's probes: the mean profile (an array) and its pre, post and jump (scalars).
    Mode "exact" continues teacher-forced after the boundary and buckets by prefix match: its numbers carry the
    prefix "tf_" so that they never share a name (a chart, a column) with the greedy-path ones."""

    def compute(ctx: Any, scope: Scope) -> dict[str, Any]:
        entropy = ctx.products.get("entropy")
        if entropy is None:
            return {}
        buckets = np.asarray(ctx.values[bucket_signal(ctx.mode)])[scope.rows]
        width = int(ctx.settings.get("boundary_width", 4))
        out: dict[str, Any] = {}
        for b, profile in entropy_profiles(np.asarray(entropy)[scope.rows], buckets).items():
            name = BUCKET_NAMES[b]
            pre, post, jump = boundary_stats(profile, ctx.w, width)
            out[f"{prefix}entropy_profile/{name}"] = profile
            if np.isfinite(jump):
                out[f"{prefix}entropy_pre/{name}"] = pre
                out[f"{prefix}entropy_post/{name}"] = post
                out[f"{prefix}boundary_jump/{name}"] = jump
        return out

    return compute


for _mode, _prefix, _after in (
    ("full", "", "the greedy path"),
    ("exact", "tf_", "the true suffix (teacher-forced)"),
):
    register_group_stat(
        GroupStat(
            f"{_prefix}boundary/<bucket>",
            f"entropy (nats) across the boundary per bucket: mean over the last j prefix positions "
            f"({_prefix}entropy_pre), the first j positions after it along {_after} ({_prefix}entropy_post), "
            f"their difference ({_prefix}boundary_jump), and the mean profile ({_prefix}entropy_profile, a picture)",
            "nats",
            _boundary(_prefix),
            needs=frozenset({"entropy"}),
            after=(bucket_signal(_mode),),
            modes=(_mode,),
            kind="image",
            outputs=(
                (f"{_prefix}entropy_pre/<bucket>", "scalar", "mean entropy over the last j prefix positions"),
                (
                    f"{_prefix}entropy_post/<bucket>",
                    "scalar",
                    f"mean entropy over the first j positions along {_after}",
                ),
                (
                    f"{_prefix}boundary_jump/<bucket>",
                    "scalar",
                    f"{_prefix}entropy_post minus {_prefix}entropy_pre",
                ),
                (f"{_prefix}entropy_profile", "image", "mean entropy profile per bucket across the boundary"),
            ),
        )
    )
