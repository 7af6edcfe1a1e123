"""n-gram and distributional memorization: duplicate and n-gram counts, their boundary profile, dose-response, Spearman."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from memwatch.signals.buckets import BUCKET_NAMES, bucket_signal
from memwatch.signals.entropy import boundary_stats
from memwatch.signals.registry import (
    Aggregate,
    GroupStat,
    Scope,
    Signal,
    register_group_stat,
    register_signal,
)

__all__ = [
    "DUP_BINS",
    "NGRAM_ORDERS",
    "NGRAM_SIGNALS",
    "distributional",
    "dup_bin",
    "ngram_profile",
    "row_spearman",
    "suffix_log_counts",
]

# The corpus products (memwatch.corpus.stats.ngram_products) the signals read.
_COUNTS = frozenset({"ngram_counts"})
# n of the per-probe suffix n-gram signals: the orders memwatch.corpus counts (MAX_ORDER = 5).
NGRAM_ORDERS = (1, 2, 3, 4, 5)
# Carlini et al. 2022's duplicate bins (a window seen once, 2-3 times, 4-15, 16-63, 64 or more), and 0: held-out
# text, or training text a streamed index has not seen yet.
DUP_BINS: tuple[tuple[str, int, float], ...] = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2-3", 2, 3),
    ("4-15", 4, 15),
    ("16-63", 16, 63),
    ("64plus", 64, math.inf),  # "64+" in the papers; "+" is no character of a TensorBoard tag
)
NGRAM_SIGNALS = (
    "dup_window",
    "dup_suffix",
    *(f"suffix_ngram{n}" for n in NGRAM_ORDERS),
    "ngram_logprob",
    "ngram_rho",
)
_ON = "switched on by MonitorConfig.ngrams"


def dup_bin(counts: np.ndarray) -> np.ndarray:
    """Index into DUP_BINS per count [N] (-1 for NaN or negative)."""
    c = np.asarray(counts, dtype=np.float64)
    out = np.full(c.shape, -1, np.int64)
    for i, (_name, lo, hi) in enumerate(DUP_BINS):
        out[(c >= lo) & (c <= hi)] = i
    return out


def suffix_log_counts(counts: np.ndarray, k: int, m: int, n: int) -> np.ndarray:
    """Mean over the m suffix positions of log(1 + count of the n-gram ending there), [N]; counts [N, k + m, n_max]
    (-1: the n-gram would start before the window, left out)."""
    c = np.asarray(counts)[:, k : k + m, n - 1].astype(np.float64)
    logs = np.where(c >= 0, np.log1p(np.maximum(c, 0.0)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a probe with no defined n-gram: NaN
        return np.nanmean(logs, axis=1) if logs.shape[1] else np.full(len(c), np.nan)


def ngram_profile(counts: np.ndarray, k: int, w: int, m: int) -> np.ndarray:
    """float64 [N, w + m]: at each position k - w .. k + m - 1 (the entropy profile's positions), the mean over
    n = 1..n_max of log(1 + count of the n-gram ending there) (orders that would start before the window left out)."""
    c = np.asarray(counts)[:, k - w : k + m, :].astype(np.float64)
    logs = np.where(c >= 0, np.log1p(np.maximum(c, 0.0)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(logs, axis=2)


def distributional(model_logp: np.ndarray, corpus_logp: np.ndarray) -> tuple[float, float, int]:
    """(Spearman rho, its two-sided p-value, pairs) between the model's and the corpus n-gram model's
    log-probabilities of the same tokens (any shapes, flattened; pairs with a non-finite value left out). NaN with
    fewer than 3 pairs or a constant side (no ranking to correlate)."""
    from scipy.stats import spearmanr

    a = np.asarray(model_logp, dtype=np.float64).reshape(-1)
    b = np.asarray(corpus_logp, dtype=np.float64).reshape(-1)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan, len(a)
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue), len(a)


# --- per-probe signals --------------------------------------------------------------------------------------------


def _window(ctx: Any) -> np.ndarray:
    return np.asarray(ctx.products["ngram_window_count"], dtype=np.float64)


def _suffix(ctx: Any) -> np.ndarray:
    return np.asarray(ctx.products["ngram_suffix_count"], dtype=np.float64)


register_signal(
    Signal(
        "dup_window",
        "occurrences of the probe's whole window (k + m tokens) in the training data indexed so far (MonitorConfig."
        "ngrams: the dataset, or the batches seen so far), documents never spanned; Carlini et al. 2022's duplicates",
        "count",
        _window,
        needs=frozenset({"ngram_window_count"}),
        default=False,  # switched on by MonitorConfig.ngrams (the products exist only then)
        aggregates=(Aggregate("median_dup_window", "median", fmt=".0f", headline=False),),
    )
)
register_signal(
    Signal(
        "dup_suffix",
        "occurrences of the probe's suffix (its m tokens, in any context) in the training data indexed so far",
        "count",
        _suffix,
        needs=frozenset({"ngram_suffix_count"}),
        default=False,
        aggregates=(Aggregate("median_dup_suffix", "median", fmt=".0f", headline=False),),
    )
)
for _n in NGRAM_ORDERS:

    def _suffix_ngram(ctx: Any, n: int = _n) -> np.ndarray:
        return suffix_log_counts(ctx.products["ngram_counts"], ctx.k, ctx.m, n)

    register_signal(
        Signal(
            f"suffix_ngram{_n}",
            f"mean over the suffix positions of log(1 + corpus count of the {_n}-gram ending there, the true prefix "
            "before it): how familiar the continuation is, span by span",
            "log(1+count)",
            _suffix_ngram,
            needs=_COUNTS,
            default=False,
            aggregates=(Aggregate(f"mean_suffix_ngram{_n}", "mean", fmt=".2f", headline=False),),
        )
    )


def _ngram_logprob(ctx: Any) -> np.ndarray:
    return np.asarray(ctx.products["ngram_logprobs"], dtype=np.float64).mean(axis=1)


register_signal(
    Signal(
        "ngram_logprob",
        "mean log-probability of the suffix tokens under the corpus's interpolated Kneser-Ney 5-gram model (counts "
        "of the data indexed so far): what an n-gram model of the training data predicts",
        "nats",
        _ngram_logprob,
        needs=frozenset({"ngram_logprobs"}),
        default=False,
        aggregates=(Aggregate("mean_ngram_logprob", "mean", fmt=".3f", headline=False),),
    )
)


def row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair of a, b [N, T] (average ranks for ties; NaN for a constant row or fewer than
    3 finite pairs, where the row has a non-finite value the row is NaN), [N]."""
    from scipy.stats import rankdata

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.full(len(a), np.nan)
    ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1) & (a.shape[1] >= 3)
    if not ok.any():
        return out
    ra = rankdata(a[ok], axis=1)
    rb = rankdata(b[ok], axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out[ok] = np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)
    return out


def _ngram_rho(ctx: Any) -> np.ndarray:
    model = np.asarray(ctx.products["token_logprobs"], dtype=np.float64)[:, -ctx.m :]
    return row_spearman(model, ctx.products["ngram_logprobs"])


register_signal(
    Signal(
        "ngram_rho",
        "Spearman correlation, over the probe's m suffix tokens, between the model's teacher-forced log-probability "
        "of each token and the corpus Kneser-Ney 5-gram model's: a continuation the model predicts as the corpus "
        "statistics do (high) is distributional, one it predicts against them is recalled (the group's pooled "
        "correlation is the distributional statistic)",
        "rho",
        _ngram_rho,
        needs=frozenset({"token_logprobs", "ngram_logprobs"}),
        default=False,
        aggregates=(Aggregate("mean_ngram_rho", "mean", fmt=".3f", headline=False),),
    )
)


# --- group statistics ---------------------------------------------------------------------------------------------


def _boundary(prefix: str) -> Any:
    """Per bucket of the scope's probes: the mean n-gram profile across the boundary (an array) and its pre, post
    and jump (scalars), as the entropy profile's (signals/entropy.py), on the true tokens."""

    def compute(ctx: Any, scope: Scope) -> dict[str, Any]:
        counts = ctx.products.get("ngram_counts")
        name = bucket_signal(ctx.mode)
        if counts is None or name not in ctx.values or not len(scope.rows):
            return {}
        profile = ngram_profile(np.asarray(counts)[scope.rows], ctx.k, ctx.w, ctx.m)
        buckets = np.asarray(ctx.values[name])[scope.rows]
        width = int(ctx.settings.get("boundary_width", 4))
        out: dict[str, Any] = {}
        for b in np.unique(buckets):
            bucket = BUCKET_NAMES[int(b)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(profile[buckets == b], axis=0)
            out[f"{prefix}ngram_profile/{bucket}"] = mean
            pre, post, jump = boundary_stats(mean, ctx.w, width)
            if np.isfinite(jump):
                out[f"{prefix}ngram_pre/{bucket}"] = pre
                out[f"{prefix}ngram_post/{bucket}"] = post
                out[f"{prefix}ngram_jump/{bucket}"] = jump
        return out

    return compute


for _mode, _prefix, _buckets in (
    ("full", "", "buckets of the greedy match"),
    ("exact", "tf_", "buckets of the prefix match (mode 'exact')"),
):
    register_group_stat(
        GroupStat(
            f"{_prefix}ngram_boundary/<bucket>",
            f"the n-gram profile across the boundary per bucket ({_buckets}): at each of the w + m positions around "
            "it, the mean over n = 1..5 of log(1 + corpus count of the n-gram of true tokens ending there); its "
            f"mean over the last j prefix positions ({_prefix}ngram_pre), the first j suffix positions "
            f"({_prefix}ngram_post) and their difference ({_prefix}ngram_jump); {_ON}",
            "log(1+count)",
            _boundary(_prefix),
            needs=_COUNTS,
            after=(bucket_signal(_mode),),
            modes=(_mode,),
            outputs=(
                (
                    f"{_prefix}ngram_pre/<bucket>",
                    "scalar",
                    "mean n-gram log count over the last j prefix positions",
                ),
                (
                    f"{_prefix}ngram_post/<bucket>",
                    "scalar",
                    "mean n-gram log count over the first j suffix positions",
                ),
                (f"{_prefix}ngram_jump/<bucket>", "scalar", f"{_prefix}ngram_post minus {_prefix}ngram_pre"),
                (
                    f"{_prefix}ngram_profile/<bucket>",
                    "matrix",
                    "mean n-gram log-count profile across the boundary",
                ),
            ),
            kept=True,  # from per-position counts the history does not store: it keeps these numbers
        )
    )


def _by_duplicates(ctx: Any, scope: Scope) -> dict[str, Any]:
    """Per duplicate bin of the window count: probes, and the share memorized (Carlini et al. 2022's dose-response on
    natural data); from stored per-probe signals, so a replayed history gives it too."""
    dup = ctx.values.get("dup_window")
    memorized = ctx.values.get("memorized")
    if dup is None or memorized is None or not len(scope.rows):
        return {}
    dup = np.asarray(dup, dtype=np.float64)[scope.rows]
    if not np.isfinite(dup).any():
        return {}
    memorized = np.asarray(memorized, dtype=np.float64)[scope.rows]
    bins = dup_bin(dup)
    out: dict[str, Any] = {}
    for i, (name, _lo, _hi) in enumerate(DUP_BINS):
        rows = bins == i
        out[f"dup_n/{name}"] = float(rows.sum())
        if rows.any():
            out[f"dup_extraction_rate/{name}"] = float(np.mean(memorized[rows] > 0))
    return out


register_group_stat(
    GroupStat(
        "dup_extraction/<bin>",
        "extraction by duplicate count (Carlini et al. 2022's dose-response on natural data): the scope's probes per "
        "bin of dup_window (0, 1, 2-3, 4-15, 16-63, 64plus) and the share of them memorized; " + _ON,
        "rate",
        _by_duplicates,
        after=("dup_window", "memorized"),
        outputs=(
            (
                "dup_n/<bin>",
                "scalar",
                "probes whose window occurs that many times in the indexed training data",
            ),
            ("dup_extraction_rate/<bin>", "scalar", "the share of them memorized (bins with probes only)"),
        ),
    )
)


def _distributional(ctx: Any, scope: Scope) -> dict[str, Any]:
    corpus = ctx.products.get("ngram_logprobs")
    model = ctx.products.get("token_logprobs")
    if corpus is None or model is None or not len(scope.rows):
        return {}
    # token_logprobs column j is token j + 1 given tokens 0..j, so its last m columns are the suffix tokens [N, m].
    model_suffix = np.asarray(model, dtype=np.float64)[scope.rows, -ctx.m :]
    rho, p, pairs = distributional(model_suffix, np.asarray(corpus, dtype=np.float64)[scope.rows])
    return {"distributional_rho": rho, "distributional_p": p, "distributional_pairs": float(pairs)}


register_group_stat(
    GroupStat(
        "distributional",
        "distributional memorization (Antoniades et al. 2024): Spearman correlation between the model's "
        "teacher-forced log-probability of each suffix token and the corpus Kneser-Ney 5-gram model's, over the "
        "scope's (context, continuation) pairs; "
        + _ON
        + " (the model's log-probabilities come with ngram_rho)",
        "rho",
        _distributional,
        # token_logprobs is read when computed (ngram_rho, on with MonitorConfig.ngrams, needs it): not asked for
        # here, so that a run without the n-gram index never pays for per-token statistics on this account.
        needs=frozenset({"ngram_logprobs"}),
        outputs=(
            ("distributional_rho", "scalar", "Spearman rho of model and corpus n-gram log-probabilities"),
            ("distributional_p", "scalar", "its two-sided p-value (scipy.stats.spearmanr)"),
            ("distributional_pairs", "scalar", "the (context, continuation) pairs it ranks"),
        ),
        kept=True,  # from per-token log-probabilities the history does not store: it keeps these numbers
    )
)
