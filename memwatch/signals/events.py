"""Memorization events between evaluations: newly memorized, forgotten, re-memorized, and when each probe first was."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.signals.registry import (
    Aggregate,
    GroupStat,
    Scope,
    Signal,
    register_group_stat,
    register_signal,
)

__all__ = ["memorization_events"]


def memorization_events(
    prev_memorized: np.ndarray | None, cur_memorized: np.ndarray, ever_memorized: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-probe events between two evaluations (Tirumala et al. 2022 forgetting; re-memorization).

    newly: memorized now, not before (includes re-memorized); first: memorized now for the first time ever;
    rememorized: memorized now, not before, but memorized at some earlier evaluation; forgotten: memorized
    before, not now. `ever_memorized` is the state *before* this evaluation. bool [N] each.
    """
    cur = np.asarray(cur_memorized, dtype=bool)
    ever = np.asarray(ever_memorized, dtype=bool)
    prev = np.zeros_like(cur) if prev_memorized is None else np.asarray(prev_memorized, dtype=bool)
    newly = cur & ~prev
    return {
        "newly": newly,
        "first": cur & ~ever,
        "rememorized": newly & ever,
        "forgotten": prev & ~cur,
    }


def _event(kind: str) -> Any:
    def compute(ctx: Any) -> np.ndarray:
        return memorization_events(ctx.previous.get("memorized"), ctx.values["memorized"], ctx.ever)[kind]

    return compute


for _kind, _stat, _label, _meaning in (
    ("newly", "newly_memorized", "new", "memorized now and not at the previous evaluation"),
    ("forgotten", "forgotten", "forgot", "memorized at the previous evaluation and not now"),
    ("rememorized", "rememorized", "again", "newly memorized after having been memorized before"),
    ("first", "first_memorized", "first", "memorized now for the first time"),
):
    register_signal(
        Signal(
            _kind,
            _meaning,
            "bool",
            _event(_kind),
            after=("memorized",),
            stored=False,
            aggregates=(
                Aggregate(
                    _stat,
                    "sum",
                    headline=_kind != "first",
                    meaning=f"probes {_meaning}",
                    label=_label,
                    fmt=".0f",
                ),
            ),
        )
    )


def _uncertain(ctx: Any) -> np.ndarray:
    """An event on a near-tie row may be a rounding difference, not a change of the model (DESIGN.md §3)."""
    tie = np.asarray(ctx.values.get("near_tie", np.zeros(len(ctx.groups), bool)), dtype=bool)
    return tie & (np.asarray(ctx.values["newly"]) | np.asarray(ctx.values["forgotten"]))


register_signal(
    Signal(
        "uncertain_event",
        "a memorization event (newly memorized, forgotten) on a row with a near tie: uncertain until confirmed",
        "bool",
        _uncertain,
        after=("newly", "forgotten", "near_tie"),
        stored=False,
        aggregates=(Aggregate("uncertain_events", "sum", headline=False, meaning="events on near-tie rows"),),
    )
)


def _first_step(ctx: Any, scope: Scope) -> dict[str, Any]:
    firsts = [int(f) for f in np.asarray(ctx.first_step)[scope.rows] if 0 <= f <= ctx.step]
    return {"first_memorized_step": float(min(firsts)) if firsts else float("nan")}


register_group_stat(
    GroupStat(
        "first_memorized_step",
        "the first step an inserted canary of the tier was memorized",
        "step",
        _first_step,
        scopes=("tier",),
        after=("memorized",),
    )
)
