"""Signals calibrated by a reference model (a PEFT model's base, or one you name): memorized by this run, or known before."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.signals.extraction import memorized
from memwatch.signals.membership import min_k_plus
from memwatch.signals.registry import Aggregate, Signal, register_signal

__all__ = ["REFERENCE_PRODUCTS"]

# What the monitor measures once with the reference model on the same panel (same teacher-forced pass and greedy
# decoding as the live model): per-token log p and its moments [N, k + m - 1], and the match count and exactness of
# its greedy continuation [N].
REFERENCE_PRODUCTS = frozenset(
    {
        "reference_token_logprobs",
        "reference_token_logp_mean",
        "reference_token_logp_var",
        "reference_match_count",
        "reference_exact",
    }
)
_TOKENS = frozenset({"token_logprobs", "reference_token_logprobs"})


def _logp(ctx: Any, name: str, suffix: bool = False) -> np.ndarray:
    values = np.asarray(ctx.products[name], dtype=np.float64)
    return values[:, -ctx.m :] if suffix else values


def _loss_calibrated(ctx: Any) -> np.ndarray:
    return -_logp(ctx, "token_logprobs").mean(axis=1) + _logp(ctx, "reference_token_logprobs").mean(axis=1)


def _suffix_nll_calibrated(ctx: Any) -> np.ndarray:
    live = -_logp(ctx, "token_logprobs", suffix=True).mean(axis=1)
    return live + _logp(ctx, "reference_token_logprobs", suffix=True).mean(axis=1)


def _min_k_plus_calibrated(ctx: Any) -> np.ndarray:
    fraction = float(ctx.settings.get("min_k", 0.2))

    def score(prefix: str) -> np.ndarray:
        return min_k_plus(
            _logp(ctx, f"{prefix}token_logprobs"),
            _logp(ctx, f"{prefix}token_logp_mean"),
            _logp(ctx, f"{prefix}token_logp_var"),
            fraction,
        )

    return score("") - score("reference_")


def _reference_memorized(ctx: Any) -> np.ndarray:
    count = ctx.products.get("reference_match_count")
    exact = np.asarray(ctx.products["reference_exact"], dtype=bool)
    threshold = float(ctx.settings.get("memorized_threshold", 1.0))
    return memorized(None if count is None else np.asarray(count), ctx.m, exact, threshold)


register_signal(
    Signal(
        "loss_calibrated",
        "the window's loss minus the reference model's (a PEFT model's base, or the reference you name): what this "
        "run learned of the text, not what the model knew before it; lower = more member-like",
        "nats",
        _loss_calibrated,
        direction=-1,
        needs=_TOKENS,
        membership=True,
        aggregates=(Aggregate("mean_loss_calibrated", "mean", fmt=".3f", headline=False),),
    )
)
register_signal(
    Signal(
        "suffix_nll_calibrated",
        "the suffix's mean NLL (a canary's secret) minus the reference model's; lower = more member-like",
        "nats",
        _suffix_nll_calibrated,
        direction=-1,
        needs=_TOKENS,
        membership=True,
        aggregates=(Aggregate("mean_suffix_nll_calibrated", "mean", fmt=".3f", headline=False),),
    )
)
register_signal(
    Signal(
        "min_k_plus_calibrated",
        "min-k%++ of the window minus the reference model's min-k%++ on it; higher = more member-like",
        "sd",
        _min_k_plus_calibrated,
        direction=1,
        needs=_TOKENS
        | {"token_logp_mean", "token_logp_var", "reference_token_logp_mean", "reference_token_logp_var"},
        membership=True,
        aggregates=(Aggregate("mean_min_k_plus_calibrated", "mean", fmt=".3f", headline=False),),
    )
)
register_signal(
    Signal(
        "reference_memorized",
        "the reference model already reproduces the suffix (same definition as memorized): known before this run",
        "bool",
        _reference_memorized,
        needs=frozenset({"reference_exact"}),
        aggregates=(
            Aggregate(
                "reference_extraction_rate",
                "mean",
                label="ref extr",
                fmt=".1%",
                headline=False,
                meaning="share of the scope the reference model already reproduces",
            ),
        ),
    )
)
