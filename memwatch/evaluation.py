"""Evaluation records: an ExtractionResult on a panel turned into buckets, transitions, events and group stats."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .result import ExtractionResult

__all__ = ["EvalRecord", "GroupStats", "ProbeTracker", "build_record", "result_buckets", "tier_rows"]


@dataclass
class GroupStats:
    """One group's numbers at one evaluation."""

    group: str
    n: int
    extracted: int  # exact extractions
    memorized: int  # exact, or match ratio >= the configured threshold
    mean_match_ratio: float  # NaN in mode "exact"
    mean_edit_similarity: float  # NaN in mode "exact"
    mean_suffix_nll: float
    buckets: list[int]  # counts per metrics.BUCKET_NAMES
    newly_memorized: int = 0
    forgotten: int = 0
    rememorized: int = 0
    transitions: np.ndarray | None = None  # [6, 6] from the previous evaluation; None at the first
    profiles: dict[str, list[float]] = field(
        default_factory=dict
    )  # bucket name -> mean entropy profile [w + m]
    boundary: dict[str, tuple[float, float, float]] = field(
        default_factory=dict
    )  # bucket -> (pre, post, jump)
    median_exposure: float = math.nan

    @property
    def extraction_rate(self) -> float:
        return self.extracted / self.n if self.n else math.nan

    @property
    def memorized_rate(self) -> float:
        return self.memorized / self.n if self.n else math.nan


@dataclass
class EvalRecord:
    """Everything one evaluation produced, per probe and per group."""

    step: int
    wall_time: float
    duration: float
    spec: dict[str, Any]
    probe_ids: list[str]
    groups: np.ndarray  # object [N]
    metas: list[Mapping[str, Any]]
    result: ExtractionResult
    memorized: np.ndarray  # bool [N]
    buckets: np.ndarray  # int64 [N]
    events: dict[str, np.ndarray]  # newly / first / rememorized / forgotten, bool [N] each
    prev_step: int | None
    stats: dict[str, GroupStats]
    exposure: np.ndarray | None = None  # float [N], NaN where not computed (canaries only)
    tiers: list[dict[str, Any]] = field(default_factory=list)  # canary dose-response (see tier_rows)
    alerts: list[Any] = field(default_factory=list)
    actions: set[str] = field(default_factory=set)


def result_buckets(result: ExtractionResult) -> np.ndarray:
    """Bucket per row, from integer match counts. In mode "exact" (no free decoding) the prefix match length, a
    lower bound of the match count, stands in."""
    count = result.match_count if result.match_count is not None else result.prefix_match_len
    return metrics.bucket_of_count(count, result.suffix_len, result.exact)


class ProbeTracker:
    """Per-probe state across evaluations: previous memorized/bucket, ever memorized, first-memorized step."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prev_step: int | None = None
        self.prev_memorized: np.ndarray | None = None
        self.prev_buckets: np.ndarray | None = None
        self.ever = np.zeros(n, dtype=bool)
        self.first_step = np.full(n, -1, dtype=np.int64)

    def update(
        self, step: int, memorized: np.ndarray, buckets: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None, int | None]:
        """Advance to a new evaluation; returns (events, previous buckets or None, previous step or None)."""
        events = metrics.memorization_events(self.prev_memorized, memorized, self.ever)
        prev_buckets, prev_step = self.prev_buckets, self.prev_step
        self.first_step[events["first"]] = step
        self.ever |= memorized
        self.prev_memorized = memorized.copy()
        self.prev_buckets = buckets.copy()
        self.prev_step = step
        return events, prev_buckets, prev_step

    def snapshot(self) -> tuple[Any, ...]:
        """The state, to restore() after an evaluation that was not recorded."""
        return (
            self.prev_step,
            None if self.prev_memorized is None else self.prev_memorized.copy(),
            None if self.prev_buckets is None else self.prev_buckets.copy(),
            self.ever.copy(),
            self.first_step.copy(),
        )

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        self.prev_step, self.prev_memorized, self.prev_buckets, self.ever, self.first_step = snapshot

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "prev_step": self.prev_step,
            "prev_memorized": None if self.prev_memorized is None else self.prev_memorized.tolist(),
            "prev_buckets": None if self.prev_buckets is None else self.prev_buckets.tolist(),
            "ever": self.ever.tolist(),
            "first_step": self.first_step.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"tracker state is for {state['n']} probes, this panel has {self.n}")
        self.prev_step = state["prev_step"]
        pm, pb = state["prev_memorized"], state["prev_buckets"]
        self.prev_memorized = None if pm is None else np.asarray(pm, dtype=bool)
        self.prev_buckets = None if pb is None else np.asarray(pb, dtype=np.int64)
        self.ever = np.asarray(state["ever"], dtype=bool)
        self.first_step = np.asarray(state["first_step"], dtype=np.int64)


def tier_rows(
    step: int,
    groups: np.ndarray,
    metas: Sequence[Mapping[str, Any]],
    exact: np.ndarray,
    match_ratio: np.ndarray | None,
    exposure: np.ndarray | None,
    first_step: np.ndarray,
) -> list[dict[str, Any]]:
    """Canary dose-response at one evaluation: per repetition tier, inserted canaries against their twins.

    first_step: per probe, the first step it was memorized (-1: never); steps after `step` are ignored, so the
    same function serves the live monitor and a replay of a history.
    """
    groups = np.asarray(groups, dtype=object)
    tiers: dict[int, dict[str, list[int]]] = {}
    for i, meta in enumerate(metas):
        rep = meta.get("repetitions")
        if rep is None or groups[i] not in ("canary", "canary_heldout"):
            continue
        slot = tiers.setdefault(int(rep), {"canary": [], "canary_heldout": []})
        slot[groups[i]].append(i)
    out = []
    for rep in sorted(tiers):
        ins = np.array(tiers[rep]["canary"], dtype=np.int64)
        twn = np.array(tiers[rep]["canary_heldout"], dtype=np.int64)
        firsts = [int(first_step[i]) for i in ins if 0 <= first_step[i] <= step]

        def mean_of(values: np.ndarray | None, rows: np.ndarray, how: Any = np.mean) -> float | None:
            if values is None or not len(rows):
                return None
            v = np.asarray(values, dtype=np.float64)[rows]
            v = v[np.isfinite(v)]
            return float(how(v)) if len(v) else None

        out.append(
            {
                "repetitions": rep,
                "step": int(step),
                "inserted": len(ins),
                "inserted_extracted": int(exact[ins].sum()) if len(ins) else 0,
                "twins": len(twn),
                "twins_extracted": int(exact[twn].sum()) if len(twn) else 0,
                # the median: one extrapolated canary far out in the tail does not set the tier's curve
                "median_exposure": mean_of(exposure, ins, np.median),
                "twins_median_exposure": mean_of(exposure, twn, np.median),
                "mean_match_ratio": mean_of(match_ratio, ins),
                "first_memorized_step": min(firsts) if firsts else None,
            }
        )
    return out


def _mean(values: np.ndarray | None) -> float:
    if values is None or len(values) == 0:
        return math.nan
    return float(np.mean(values))


def build_record(
    *,
    step: int,
    wall_time: float,
    duration: float,
    spec: Mapping[str, Any],
    probe_ids: Sequence[str],
    groups: np.ndarray,
    metas: Sequence[Mapping[str, Any]],
    result: ExtractionResult,
    tracker: ProbeTracker,
    memorized_threshold: float = 1.0,
    boundary_width: int = 4,
    exposure: np.ndarray | None = None,
) -> EvalRecord:
    """Turn one evaluation's ExtractionResult into an EvalRecord and advance the tracker."""
    memorized = metrics.memorized(result.match_ratio, result.exact, memorized_threshold)
    buckets = result_buckets(result)
    events, prev_buckets, prev_step = tracker.update(step, memorized, buckets)
    groups = np.asarray(groups, dtype=object)
    w = result.entropy_window
    stats: dict[str, GroupStats] = {}
    for g in dict.fromkeys(groups.tolist()):
        rows = np.flatnonzero(groups == g)
        b = buckets[rows]
        gs = GroupStats(
            group=g,
            n=len(rows),
            extracted=int(result.exact[rows].sum()),
            memorized=int(memorized[rows].sum()),
            mean_match_ratio=_mean(None if result.match_ratio is None else result.match_ratio[rows]),
            mean_edit_similarity=_mean(
                None if result.edit_similarity is None else result.edit_similarity[rows]
            ),
            mean_suffix_nll=_mean(result.suffix_nll[rows]),
            buckets=np.bincount(b, minlength=len(metrics.BUCKET_NAMES)).tolist(),
            newly_memorized=int(events["newly"][rows].sum()),
            forgotten=int(events["forgotten"][rows].sum()),
            rememorized=int(events["rememorized"][rows].sum()),
            transitions=None if prev_buckets is None else metrics.transition_matrix(prev_buckets[rows], b),
        )
        if exposure is not None:
            ex = exposure[rows]
            ex = ex[np.isfinite(ex)]
            gs.median_exposure = float(np.median(ex)) if len(ex) else math.nan
        for bi, profile in metrics.entropy_profiles(result.entropy[rows], b).items():
            name = metrics.BUCKET_NAMES[bi]
            gs.profiles[name] = profile.tolist()
            gs.boundary[name] = metrics.boundary_stats(profile, w, boundary_width)
        stats[g] = gs
    tiers = tier_rows(step, groups, metas, result.exact, result.match_ratio, exposure, tracker.first_step)
    return EvalRecord(
        tiers=tiers,
        step=step,
        wall_time=wall_time,
        duration=duration,
        spec=dict(spec),
        probe_ids=list(probe_ids),
        groups=groups,
        metas=list(metas),
        result=result,
        memorized=memorized,
        buckets=buckets,
        events=events,
        prev_step=prev_step,
        stats=stats,
        exposure=exposure,
    )
