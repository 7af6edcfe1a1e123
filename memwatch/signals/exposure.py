"""Canary exposure (Carlini et al. 2019; tensorflow_privacy's secret_sharer is the reference) as signals."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from memwatch.signals.registry import Aggregate, Signal, register_signal

__all__ = ["exposure", "exposure_extrapolated", "exposure_rank"]


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


def _product(name: str) -> Any:
    def compute(ctx: Any) -> np.ndarray:
        values = ctx.products.get(name)
        return np.full(len(ctx.groups), np.nan) if values is None else np.asarray(values, dtype=np.float64)

    return compute


register_signal(
    Signal(
        "exposure",
        "canary exposure in bits: the rank form, extrapolated where the secret beats every reference",
        "bits",
        _product("exposure"),
        direction=1,
        needs=frozenset({"exposure"}),
        aggregates=(
            Aggregate(
                "median_exposure",
                "median",
                ("group", "tier", "twins"),
                meaning="median canary exposure (bits)",
                label="exposure",
                fmt=".1f",
                tracked=True,
            ),
        ),
    )
)
register_signal(
    Signal(
        "exposure_rank",
        "canary exposure in bits by rank among the references: log2 R - log2 rank",
        "bits",
        _product("exposure_rank"),
        direction=1,
        needs=frozenset({"exposure"}),
        aggregates=(Aggregate("median_exposure_rank", "median", ("tier",), headline=False),),
    )
)
register_signal(
    Signal(
        "exposure_extrapolated",
        "canary exposure in bits from a skew-normal fitted to the references: -log2 F(secret)",
        "bits",
        _product("exposure_extrapolated"),
        direction=1,
        needs=frozenset({"exposure"}),
        aggregates=(Aggregate("median_exposure_extrapolated", "median", ("tier",), headline=False),),
    )
)
