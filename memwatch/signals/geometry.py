"""Geometric evidence: the local intrinsic dimension of each probe's prefix representation among the panel's."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.signals.registry import Aggregate, Signal, register_signal

__all__ = ["LID_NEIGHBORS", "local_intrinsic_dimension"]

# Levina and Bickel's estimator over 20 neighbours, the count Ross et al. 2024 and scikit-dimension use by default:
# fewer makes the estimate noisy, more smooths memorized points into their unmemorized surroundings.
LID_NEIGHBORS = 20


def local_intrinsic_dimension(points: np.ndarray, neighbors: int = LID_NEIGHBORS) -> np.ndarray:
    """Pointwise maximum-likelihood intrinsic dimension (Levina & Bickel 2004, scikit-dimension's MLE) of each row
    of points [N, H] among the others, over min(neighbors, N - 1) neighbours -> [N]; NaN where undefined (fewer
    than 3 points, or a point with duplicates among its neighbours)."""
    import skdim

    x = np.asarray(points, dtype=np.float64)
    n = len(x)
    out = np.full(n, np.nan)
    if n < 3:
        return out
    k = min(neighbors, n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dims = np.asarray(skdim.id.MLE().fit_transform_pw(x, n_neighbors=k, n_jobs=1), dtype=np.float64)
    finite = np.isfinite(dims) & (dims > 0)
    out[finite] = dims[finite]
    return out


def _lid(ctx: Any) -> np.ndarray:
    return local_intrinsic_dimension(ctx.products["hidden_prefix"])


register_signal(
    Signal(
        "lid",
        "local intrinsic dimension of the probe's mean-pooled prefix representation among the panel's (Ross et al. "
        "2024's geometric evidence, at the embedding view's evaluations): low for memorized points of either kind, "
        "compared with the held-out control; lower = more member-like",
        "dims",
        _lid,
        direction=-1,
        needs=frozenset({"hidden_prefix"}),
        membership=True,
        default=False,  # an optional package (scikit-dimension, with numba): switched on by name
        requires=("skdim", "lid"),
        aggregates=(
            Aggregate("median_lid", "median", scopes=("group", "tier", "twins"), fmt=".1f", headline=False),
        ),
    )
)
