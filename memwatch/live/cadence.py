"""When to evaluate, and when an evaluation also scores exposure or writes the embedding view."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

__all__ = ["Cadence", "embedding_due", "exposure_due", "nice_ceil"]


def nice_ceil(x: float) -> int:
    """Smallest 1, 2 or 5 times a power of ten that is >= x (readable evaluation intervals)."""
    if x <= 1:
        return 1
    exp = 10 ** math.floor(math.log10(x))
    for mult in (1, 2, 5, 10):
        if mult * exp >= x:
            return int(mult * exp)
    return int(10 * exp)  # pragma: no cover


class Cadence:
    """Decides at which optimizer steps to evaluate.

    Fixed: every `every_n_steps` steps. Adaptive (every_n_steps=None): after each evaluation the interval is
    set to the smallest 1/2/5 x 10^k steps for which evaluation time / training time <= max_overhead, using
    the measured evaluation cost and the median training step time; until a step time is known, the first
    `warmup_steps` steps are timed.
    """

    def __init__(self, every_n_steps: int | None, max_overhead: float, warmup_steps: int = 10) -> None:
        self.fixed = every_n_steps
        self.max_overhead = max_overhead
        self.warmup_steps = warmup_steps
        self.interval: int | None = every_n_steps
        self.last_step: int | None = None
        self.eval_cost: float | None = None
        self.step_times: list[float] = []

    def add_step_time(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self.step_times.append(seconds)
        del self.step_times[:-200]  # a recent window
        if self.interval is None and len(self.step_times) >= self.warmup_steps:
            self._update_interval()  # the first adaptive interval, once the warm-up steps are timed

    def _update_interval(self) -> None:
        if (
            self.fixed is not None
            or self.eval_cost is None
            or len(self.step_times) < min(3, self.warmup_steps)
        ):
            return
        step_time = statistics.median(self.step_times)
        self.interval = nice_ceil(self.eval_cost / (self.max_overhead * step_time))

    def due(self, step: int) -> bool:
        if self.interval is None:
            # Adaptive with no known evaluation cost (no baseline, or nothing to go by after a resume): evaluate
            # once right after the warm-up, which measures it.
            ready = (
                self.fixed is None and self.eval_cost is None and len(self.step_times) >= self.warmup_steps
            )
            return ready and step != self.last_step
        return step % self.interval == 0 and step != self.last_step

    def evaluated(self, step: int, seconds: float) -> None:
        self.last_step = step
        # The smoothed cost decides the next interval; a single slow evaluation (e.g. a first-call warm-up) does
        # not lock in a long interval.
        self.eval_cost = seconds if self.eval_cost is None else 0.5 * (self.eval_cost + seconds)
        self._update_interval()

    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "last_step": self.last_step, "eval_cost": self.eval_cost}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.fixed is None:
            self.interval = state.get("interval")
        self.last_step = state.get("last_step")
        self.eval_cost = state.get("eval_cost")


def exposure_due(every: int | None, n_scored: int, references: int, n_evaluated: int) -> bool:
    """Exposure at every `every`-th evaluation; every=None sizes the interval so that one evaluation scores about
    32k candidate suffixes on average (n_scored canaries with `references` references each)."""
    if n_scored == 0:
        return False
    if every is None:
        every = max(1, math.ceil(n_scored * references / 32768))
    return n_evaluated % every == 0


def embedding_due(every: int | None, n_evaluated: int, final: bool) -> bool:
    """The embedding view at the first, the last (final) and every `every`-th evaluation; never with every=None."""
    if every is None:
        return False
    return final or n_evaluated % every == 0
