"""Membership signals (loss, zlib ratio, min-k% prob, min-k%++) and their separation of members from controls."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from memwatch.signals.registry import Aggregate, Contrast, Signal, register_contrast, register_signal

__all__ = [
    "MIN_CONTROLS",
    "VAR_FLOOR",
    "auc",
    "clopper_pearson",
    "min_k",
    "min_k_plus",
    "tpr_at_fpr",
    "zlib_length",
]

# min-k%++ divides by the standard deviation of log p under the model's distribution; a near-deterministic
# position has sigma ~ 0, and the floor keeps its standardised value finite (Zhang et al. 2024 add a small eps).
VAR_FLOOR = 1e-6
# A TPR at an FPR of f needs at least 1/f controls for the threshold to exist at all: with fewer, "TPR at 1% FPR"
# is the TPR at 0% FPR, a different and noisier number. Below this, it is refused, never shown.
MIN_CONTROLS = {"1pct": 100, "0.1pct": 1000}
_FPRS = {"1pct": 0.01, "0.1pct": 0.001}


def min_k(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Mean of the max(1, floor(fraction * T)) lowest values of each row of scores [N, T] -> [N]."""
    scores = np.asarray(scores, dtype=np.float64)
    t = scores.shape[1]
    if t == 0:
        return np.full(scores.shape[0], np.nan)
    n = max(1, math.floor(fraction * t))
    return np.sort(scores, axis=1)[:, :n].mean(axis=1)


def min_k_plus(logp: np.ndarray, mean: np.ndarray, var: np.ndarray, fraction: float) -> np.ndarray:
    """min-k%++ (Zhang et al. 2024): each token's log p standardised by the mean and standard deviation of log p
    under the model's own next-token distribution at that position, then min-k% of those. [N, T] -> [N]."""
    z = (np.asarray(logp, np.float64) - np.asarray(mean, np.float64)) / np.sqrt(
        np.maximum(np.asarray(var, np.float64), VAR_FLOOR)
    )
    return min_k(z, fraction)


def zlib_length(data: bytes) -> int:
    """zlib-compressed length in bytes (level 9, as Carlini et al. 2021's zlib ratio)."""
    return len(zlib.compress(data, 9))


def _window_bytes(ctx: Any) -> list[bytes]:
    """Each probe window's decoded text (when the monitor has a tokenizer), or its token ids as bytes."""
    given = ctx.products.get("window_bytes")
    if given is not None:
        return list(given)
    tokens = np.asarray(ctx.tokens)[:, : ctx.k + ctx.m]
    width = "<u2" if tokens.size == 0 or int(tokens.max()) < 1 << 16 else "<u4"
    return [row.astype(width).tobytes() for row in tokens]


def _fraction(ctx: Any) -> float:
    return float(ctx.settings.get("min_k", 0.2))


def _span(ctx: Any, name: str, suffix: bool) -> np.ndarray:
    """A per-token product [N, k + m - 1], the whole window or only its last m columns (the suffix: a canary's
    secret, since a canary's suffix is exactly its secret)."""
    values = np.asarray(ctx.products[name], dtype=np.float64)
    return values[:, -ctx.m :] if suffix else values


_TOKENS = frozenset({"token_logprobs"})

for _suffix, _where, _label in (
    (False, "the whole window", ""),
    (True, "the suffix (a canary's secret)", "suffix_"),
):

    def _loss(ctx: Any, suffix: bool = _suffix) -> np.ndarray:
        return -_span(ctx, "token_logprobs", suffix).mean(axis=1)

    def _min_k(ctx: Any, suffix: bool = _suffix) -> np.ndarray:
        return min_k(_span(ctx, "token_logprobs", suffix), _fraction(ctx))

    def _min_k_plus(ctx: Any, suffix: bool = _suffix) -> np.ndarray:
        return min_k_plus(
            _span(ctx, "token_logprobs", suffix),
            _span(ctx, "token_logp_mean", suffix),
            _span(ctx, "token_logp_var", suffix),
            _fraction(ctx),
        )

    if not _suffix:  # the suffix's mean NLL is the suffix_nll signal already (extraction.py)
        register_signal(
            Signal(
                "loss",
                "mean NLL of the true tokens over the whole window (teacher-forced); lower = more member-like",
                "nats",
                _loss,
                direction=-1,
                needs=_TOKENS,
                membership=True,
                aggregates=(Aggregate("mean_loss", "mean", label="loss", fmt=".3f", headline=False),),
            )
        )
    register_signal(
        Signal(
            f"{_label}min_k",
            f"min-k% prob over {_where}: the mean of the lowest k% token log-probs (k = MonitorConfig.min_k); "
            "higher = more member-like",
            "nats",
            _min_k,
            direction=1,
            needs=_TOKENS,
            membership=True,
            aggregates=(Aggregate(f"mean_{_label}min_k", "mean", fmt=".3f", headline=False),),
        )
    )
    register_signal(
        Signal(
            f"{_label}min_k_plus",
            f"min-k%++ over {_where}: token log-probs standardised by the mean and deviation of log p under the "
            "model's own distribution, then min-k%; higher = more member-like",
            "sd",
            _min_k_plus,
            direction=1,
            needs=_TOKENS,
            membership=True,
            aggregates=(Aggregate(f"mean_{_label}min_k_plus", "mean", fmt=".3f", headline=False),),
        )
    )


def _zlib_ratio(ctx: Any) -> np.ndarray:
    loss = np.asarray(ctx.values["loss"], dtype=np.float64)
    lengths = np.array([zlib_length(b) for b in _window_bytes(ctx)], dtype=np.float64)
    return loss / np.maximum(lengths, 1.0)


register_signal(
    Signal(
        "zlib_ratio",
        "the window's loss over its zlib-compressed length in bytes (decoded text, or token bytes without a "
        "tokenizer): low loss on text that does not compress is suspicious; lower = more member-like",
        "nats/byte",
        _zlib_ratio,
        direction=-1,
        after=("loss",),
        needs=_TOKENS,
        membership=True,
        aggregates=(Aggregate("mean_zlib_ratio", "mean", fmt=".4f", headline=False),),
    )
)


# --- separation of members from controls ------------------------------------------------------------------------


def auc(member: np.ndarray, control: np.ndarray) -> float:
    """ROC AUC of telling members (positives) from controls by the score (higher = member), ties counted half
    (scikit-learn's roc_auc_score); NaN with fewer than one of each or non-finite scores only."""
    from sklearn.metrics import roc_auc_score

    member, control = _finite(member), _finite(control)
    if not len(member) or not len(control):
        return math.nan
    y = np.r_[np.ones(len(member)), np.zeros(len(control))]
    return float(roc_auc_score(y, np.r_[member, control]))


def tpr_at_fpr(member: np.ndarray, control: np.ndarray, fpr: float) -> tuple[float, int]:
    """The largest TPR at a threshold whose FPR is at most `fpr` (scikit-learn's roc_curve, all thresholds), and
    the number of members above that threshold (for its interval)."""
    from sklearn.metrics import roc_curve

    member, control = _finite(member), _finite(control)
    y = np.r_[np.ones(len(member)), np.zeros(len(control))]
    fprs, tprs, _ = roc_curve(y, np.r_[member, control], drop_intermediate=False)
    ok = fprs <= fpr + 1e-12
    best = float(tprs[ok].max()) if ok.any() else 0.0
    return best, round(best * len(member))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion k/n (scipy's binomtest)."""
    from scipy.stats import binomtest

    if n <= 0:
        return math.nan, math.nan
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _auc(member: np.ndarray, control: np.ndarray) -> Mapping[str, float]:
    return {"auc": auc(member, control)}


def _tpr(member: np.ndarray, control: np.ndarray) -> Mapping[str, float]:
    """TPR at 1% and 0.1% FPR with 95% Clopper-Pearson intervals; NaN (refused) with too few controls."""
    out: dict[str, float] = {}
    members, controls = len(_finite(member)), len(_finite(control))
    for label, fpr in _FPRS.items():
        key = f"tpr_{label}"
        if controls < MIN_CONTROLS[label] or not members:
            out[key] = out[f"{key}_lo"] = out[f"{key}_hi"] = math.nan
            continue
        tpr, hits = tpr_at_fpr(member, control, fpr)
        out[key] = tpr
        out[f"{key}_lo"], out[f"{key}_hi"] = clopper_pearson(hits, members)
    return out


register_contrast(
    Contrast(
        "auc",
        "ROC AUC of telling the members from their controls by the signal (0.5: no separation)",
        _auc,
    )
)
register_contrast(
    Contrast(
        "tpr",
        "TPR at 1% and 0.1% FPR with 95% Clopper-Pearson intervals (_lo, _hi); refused (null) with fewer than "
        f"{MIN_CONTROLS['1pct']} (1%) or {MIN_CONTROLS['0.1pct']} (0.1%) controls",
        _tpr,
        headline=False,
        outputs=tuple(
            (
                f"tpr_{label}{end}",
                f"{what} at {label.replace('pct', '%')} FPR, refused (null) below {need} controls",
            )
            for label, need in MIN_CONTROLS.items()
            for end, what in (
                ("", "TPR"),
                ("_lo", "lower end of the TPR's 95% Clopper-Pearson interval"),
                ("_hi", "upper end of that interval"),
            )
        ),
    )
)
