"""Signals calibrated by a reference model (a PEFT model's base, or one you name): memorized by this run, or known before."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from memwatch.signals.extraction import memorized
from memwatch.signals.registry import REGISTRY, Aggregate, Signal, register_signal

__all__ = ["REFERENCED", "REFERENCE_PRODUCTS"]

# What the monitor measures once with the reference model on the same panel (same teacher-forced pass and greedy
# decoding as the live model): these ExtractionResult fields, as products named reference_<field>.
REFERENCED = ("token_logprobs", "token_logp_mean", "token_logp_var", "suffix_nll", "match_count", "exact")
REFERENCE_PRODUCTS = frozenset(f"reference_{name}" for name in REFERENCED)


def _on_reference(ctx: Any) -> Any:
    """The same evaluation as the reference model saw it: its products in place of the trained model's, and no
    signal values yet."""
    products = {**ctx.products, **{name: ctx.products.get(f"reference_{name}") for name in REFERENCED}}
    return dataclasses.replace(ctx, products=products, values={})


def _calibrated(name: str) -> tuple[Any, frozenset[str]]:
    """compute(ctx) of `name` minus the same signal on the reference (one definition, both sides), and what it
    needs: the signal's own products and their reference twins."""
    signal = REGISTRY.signals[name]

    def compute(ctx: Any) -> np.ndarray:
        live = ctx.values.get(name)  # computed already when the signal is on (after=)
        if live is None:
            live = signal.compute(ctx)
        return np.asarray(live, np.float64) - np.asarray(signal.compute(_on_reference(ctx)), np.float64)

    return compute, signal.needs | {f"reference_{n}" for n in signal.needs if n in REFERENCED}


def _reference_memorized(ctx: Any) -> np.ndarray:
    count = ctx.products.get("reference_match_count")
    exact = np.asarray(ctx.products["reference_exact"], dtype=bool)
    threshold = float(ctx.settings.get("memorized_threshold", 1.0))
    return memorized(None if count is None else np.asarray(count), ctx.m, exact, threshold)


for _name, _base, _meaning in (
    (
        "loss_calibrated",
        "loss",
        "the window's loss minus the reference model's (a PEFT model's base, or the reference you name): what this "
        "run learned of the text, not what the model knew before it; lower = more member-like",
    ),
    (
        "suffix_nll_calibrated",
        "suffix_nll",
        "the suffix's mean NLL (a canary's secret) minus the reference model's; lower = more member-like",
    ),
    (
        "min_k_plus_calibrated",
        "min_k_plus",
        "min-k%++ of the window minus the reference model's min-k%++ on it; higher = more member-like",
    ),
):
    _compute, _needs = _calibrated(_base)
    register_signal(
        Signal(
            _name,
            _meaning,
            REGISTRY.signals[_base].unit,
            _compute,
            direction=REGISTRY.signals[_base].direction,
            after=(_base,),
            needs=_needs,
            modes=REGISTRY.signals[_base].modes,
            membership=True,
            aggregates=(Aggregate(f"mean_{_name}", "mean", fmt=".3f", headline=False),),
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
