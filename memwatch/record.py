"""An evaluation's record, built once from its products and the signal registry (live, and when a history is
replayed: the same code, so post-hoc numbers are the live ones)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memwatch.engine.result import ExtractionResult
from memwatch.signals import REGISTRY, Registry, Scope
from memwatch.signals.buckets import BUCKET_NAMES, bucket_signal

__all__ = [
    "DEFAULT_PAIRS",
    "GROUP_ORDER",
    "EvalRecord",
    "GroupView",
    "ProbeTracker",
    "build_record",
    "products_of",
    "scopes_of",
]

# DESIGN.md §2 groups, in the order panels and reports list them.
GROUP_ORDER = ("canary", "canary_heldout", "train", "heldout")
# Member groups against their controls: the contrasts (membership separation) are computed for these pairs.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("train", "heldout"), ("canary", "canary_heldout"))
EVENTS = ("newly", "first", "rememorized", "forgotten")


def products_of(result: ExtractionResult, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An extraction's per-probe arrays by name (its fields) and what the measurement added (exposure, ...)."""
    out: dict[str, Any] = {name: getattr(result, name) for name in result.ARRAY_FIELDS}
    out.update(extra or {})
    return out


class ProbeTracker:
    """Per-probe state across evaluations: the previous evaluation's memorized flags and buckets, whether each
    probe was ever memorized, and the first step it was."""

    TRACKED = ("memorized", "bucket", "prefix_bucket")

    def __init__(self, n: int) -> None:
        self.n = n
        self.prev_step: int | None = None
        self.previous: dict[str, np.ndarray] = {}
        self.ever = np.zeros(n, dtype=bool)
        self.first_step = np.full(n, -1, dtype=np.int64)

    @property
    def prev_memorized(self) -> np.ndarray | None:
        return self.previous.get("memorized")

    def advance(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        memorized = np.asarray(values["memorized"], dtype=bool)
        self.first_step[memorized & ~self.ever & (self.first_step < 0)] = step
        self.ever |= memorized
        self.previous = {k: np.asarray(values[k]).copy() for k in self.TRACKED if k in values}
        self.prev_step = step

    def snapshot(self) -> tuple[Any, ...]:
        """The state, to restore() after an evaluation that was not recorded."""
        return (
            self.prev_step,
            {k: v.copy() for k, v in self.previous.items()},
            self.ever.copy(),
            self.first_step.copy(),
        )

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        self.prev_step, self.previous, self.ever, self.first_step = snapshot

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "prev_step": self.prev_step,
            "previous": {k: v.tolist() for k, v in self.previous.items()},
            "ever": self.ever.tolist(),
            "first_step": self.first_step.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"tracker state is for {state['n']} probes, this panel has {self.n}")
        self.prev_step = state["prev_step"]
        previous = dict(state.get("previous") or {})
        if "prev_memorized" in state and state["prev_memorized"] is not None:  # a 0.1.0 checkpoint's state
            previous = {"memorized": state["prev_memorized"], "bucket": state.get("prev_buckets")}
        self.previous = {k: np.asarray(v) for k, v in previous.items() if v is not None}
        if "memorized" in self.previous:
            self.previous["memorized"] = self.previous["memorized"].astype(bool)
        self.ever = np.asarray(state["ever"], dtype=bool)
        self.first_step = np.asarray(state["first_step"], dtype=np.int64)


def scopes_of(
    groups: np.ndarray, metas: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS
) -> list[Scope]:
    """Where group statistics are computed: every group present (DESIGN.md's first, then yours in order of
    appearance), every canary tier (inserted canaries of r repetitions against their twins), every pair whose two
    groups are present (a member group against its control)."""
    groups = np.asarray(groups, dtype=object)
    present = list(dict.fromkeys(groups.tolist()))
    ordered = [g for g in GROUP_ORDER if g in present] + [g for g in present if g not in GROUP_ORDER]
    scopes = [Scope("group", g, np.flatnonzero(groups == g), label=g) for g in ordered]
    reps = np.array(
        [
            m.get("repetitions", -1) if g in ("canary", "canary_heldout") else -1
            for g, m in zip(groups, metas, strict=True)
        ]
    )
    for r in sorted({int(x) for x in reps if x >= 0}):
        inserted = np.flatnonzero((groups == "canary") & (reps == r))
        twins = np.flatnonzero((groups == "canary_heldout") & (reps == r))
        scopes.append(Scope("tier", f"canaries/{r}x", inserted, twins, label=f"{r}x"))
    for member, control in pairs:
        if member in present and control in present:
            key = f"{member}~{control}"
            scopes.append(
                Scope("pair", key, np.flatnonzero(groups == member), np.flatnonzero(groups == control), key)
            )
    return scopes


@dataclass
class _Context:
    """What signals and group statistics see (signals.Context): one evaluation's products and the panel, the
    signals computed so far and the per-probe state before this evaluation."""

    products: Mapping[str, Any]
    values: dict[str, np.ndarray]
    tokens: np.ndarray
    groups: np.ndarray
    metas: Sequence[Mapping[str, Any]]
    k: int
    m: int
    w: int
    mode: str
    settings: Mapping[str, Any]
    step: int
    previous: Mapping[str, np.ndarray]
    ever: np.ndarray
    first_step: np.ndarray


@dataclass
class EvalRecord:
    """Everything one evaluation produced: per-probe signal values, group statistics by key
    ("<scope>/<stat>": train/extraction_rate, canaries/4x/median_exposure, train~heldout/loss_auc), and arrays
    (entropy profiles, transition matrices) by key."""

    step: int
    wall_time: float
    duration: float
    spec: dict[str, Any]
    probe_ids: list[str]
    groups: np.ndarray  # object [N]
    metas: list[Mapping[str, Any]]
    values: dict[str, np.ndarray]  # signal -> [N]
    scalars: dict[str, float]
    arrays: dict[str, np.ndarray]
    scopes: list[Scope]
    prev_step: int | None
    result: ExtractionResult | None = None
    label: str | None = None
    alerts: list[Any] = field(default_factory=list)
    actions: set[str] = field(default_factory=set)

    @property
    def mode(self) -> str:
        return str(self.spec.get("mode", "full"))

    @property
    def memorized(self) -> np.ndarray:
        return self.values["memorized"]

    @property
    def buckets(self) -> np.ndarray:
        return self.values[bucket_signal(self.mode)]

    @property
    def events(self) -> dict[str, np.ndarray]:
        return {k: self.values[k] for k in EVENTS if k in self.values}

    @property
    def exposure(self) -> np.ndarray | None:
        """Canary exposure in bits [N] (NaN where not computed), or None at an evaluation that scored none."""
        values = self.values.get("exposure")
        return values if values is not None and np.isfinite(values).any() else None

    def scope(self, key: str) -> dict[str, float]:
        """Every scalar of one scope, by statistic name."""
        prefix = key + "/"
        return {k[len(prefix) :]: v for k, v in self.scalars.items() if k.startswith(prefix)}

    @property
    def stats(self) -> dict[str, GroupView]:
        """Per group, its statistics by attribute (record.stats["train"].extraction_rate)."""
        return {s.key: GroupView(self, s.key) for s in self.scopes if s.kind == "group"}

    @property
    def tiers(self) -> list[dict[str, Any]]:
        """The canary dose-response at this evaluation: one row per repetition tier, inserted against twins."""
        return [
            tier_row(self.step, self.scope(s.key), int(s.label[:-1])) for s in self.scopes if s.kind == "tier"
        ]


def finite_or_none(value: Any) -> Any:
    """JSON-friendly: NaN and infinities as None, numpy scalars as Python numbers, anything else as it is."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def tier_row(step: int, stats: Mapping[str, float], repetitions: int) -> dict[str, Any]:
    """A tier's statistics as the dose-response table's row (null where a number does not exist)."""
    first = stats.get("first_memorized_step", math.nan)
    row = {
        "repetitions": repetitions,
        "step": int(step),
        "inserted": int(stats.get("n", 0)),
        "inserted_extracted": int(stats.get("extracted", 0) or 0),
        "twins": int(stats.get("twins_n", 0)),
        "twins_extracted": int(finite_or_none(stats.get("twins_extracted")) or 0),
        "median_exposure": finite_or_none(stats.get("median_exposure")),
        "twins_median_exposure": finite_or_none(stats.get("twins_median_exposure")),
        "mean_match_ratio": finite_or_none(stats.get("mean_match_ratio")),
        "first_memorized_step": int(first) if math.isfinite(first) else None,
    }
    legacy = {"n", "extracted", "twins_n", "twins_extracted", "first_memorized_step"}
    row.update({k: finite_or_none(v) for k, v in stats.items() if k not in row and k not in legacy})
    return row


class GroupView:
    """One group's statistics of a record, by attribute; a few of them shaped for tables (buckets as a list in
    BUCKET_NAMES order, the boundary as bucket -> (pre, post, jump))."""

    def __init__(self, record: EvalRecord, key: str) -> None:
        self._record = record
        self.group = key
        self._stats = record.scope(key)
        self._prefix = "" if record.mode == "full" else "tf_"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._stats[name]
        except KeyError:
            raise AttributeError(f"group {self.group!r} has no statistic {name!r}") from None

    @property
    def n(self) -> int:
        return int(self._stats.get("n", 0))

    @property
    def extracted(self) -> int:
        return int(self._stats.get("extracted", 0))

    @property
    def memorized(self) -> int:
        return int(self._stats.get("memorized", 0))

    @property
    def buckets(self) -> list[int]:
        name = bucket_signal(self._record.mode)
        return [int(self._stats.get(f"{name}/{b}", 0)) for b in BUCKET_NAMES]

    @property
    def boundary(self) -> dict[str, tuple[float, float, float]]:
        p = self._prefix
        return {
            b: (
                self._stats[f"{p}entropy_pre/{b}"],
                self._stats[f"{p}entropy_post/{b}"],
                self._stats[f"{p}boundary_jump/{b}"],
            )
            for b in BUCKET_NAMES
            if f"{p}boundary_jump/{b}" in self._stats
        }

    @property
    def profiles(self) -> dict[str, list[float]]:
        head = f"{self.group}/{self._prefix}entropy_profile/"
        return {k[len(head) :]: v.tolist() for k, v in self._record.arrays.items() if k.startswith(head)}

    @property
    def transitions(self) -> np.ndarray | None:
        return self._record.arrays.get(f"{self.group}/transitions")

    @property
    def newly_memorized(self) -> int:
        return int(self._stats.get("newly_memorized", 0))

    @property
    def forgotten(self) -> int:
        return int(self._stats.get("forgotten", 0))

    @property
    def rememorized(self) -> int:
        return int(self._stats.get("rememorized", 0))


def build_record(
    *,
    step: int,
    spec: Mapping[str, Any],
    probe_ids: Sequence[str],
    groups: np.ndarray,
    metas: Sequence[Mapping[str, Any]],
    tokens: np.ndarray,
    products: Mapping[str, Any],
    tracker: ProbeTracker,
    settings: Mapping[str, Any] | None = None,
    preset: Mapping[str, np.ndarray] | None = None,
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    overrides: Mapping[str, bool] | None = None,
    registry: Registry = REGISTRY,
    wall_time: float = 0.0,
    duration: float = 0.0,
    label: str | None = None,
    result: ExtractionResult | None = None,
) -> EvalRecord:
    """One evaluation's record: every enabled signal per probe (in dependency order; `preset` holds values read
    from a history, used as they are), then per scope every aggregate, group statistic and contrast; the tracker
    advances to this evaluation.

    tokens: the panel's windows [N, k + m]; settings: the run's definitions (memorized_threshold, boundary_width).
    """
    k, m, w = int(spec["prefix_len"]), int(spec["suffix_len"]), int(spec["entropy_window"])
    mode = str(spec.get("mode", "full"))
    groups = np.asarray(groups, dtype=object)
    n = len(groups)
    ctx = _Context(
        products=products,
        values={},
        tokens=np.asarray(tokens),
        groups=groups,
        metas=list(metas),
        k=k,
        m=m,
        w=w,
        mode=mode,
        settings=dict(settings or {}),
        step=int(step),
        previous=tracker.previous,
        ever=tracker.ever,
        first_step=tracker.first_step,
    )
    preset = preset or {}
    available = {name for name, value in products.items() if value is not None}
    for signal in registry.enabled(overrides, mode):
        if signal.name in preset:
            value = np.asarray(preset[signal.name])
        elif signal.needs <= available:
            value = np.asarray(signal.compute(ctx))
        else:
            value = np.full(n, np.nan)  # not measured (a history replayed from before the signal existed)
        if value.shape[:1] != (n,):
            raise ValueError(f"signal {signal.name!r} gave shape {value.shape}; expected ({n},)")
        ctx.values[signal.name] = value
    prev_step = tracker.prev_step
    first = ctx.values.get("first")
    if first is not None:  # the tier statistics see this evaluation's first memorizations too
        ctx.first_step = np.where(
            np.asarray(first, bool) & (tracker.first_step < 0), step, tracker.first_step
        )
    scopes = scopes_of(groups, metas, pairs)
    scalars: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    enabled = [s for s in registry.signals.values() if s.name in ctx.values]  # presentation order
    for scope in scopes:
        _scope_stats(scope, ctx, enabled, registry, mode, scalars, arrays, overrides)
    tracker.advance(step, ctx.values)
    return EvalRecord(
        step=int(step),
        wall_time=wall_time,
        duration=duration,
        spec=dict(spec),
        probe_ids=list(probe_ids),
        groups=groups,
        metas=list(metas),
        values=ctx.values,
        scalars=scalars,
        arrays=arrays,
        scopes=scopes,
        prev_step=prev_step,
        result=result,
        label=label,
    )


def _scope_stats(
    scope: Scope,
    ctx: _Context,
    signals: Sequence[Any],
    registry: Registry,
    mode: str,
    scalars: dict[str, float],
    arrays: dict[str, np.ndarray],
    overrides: Mapping[str, bool] | None,
) -> None:
    kind = scope.kind
    for stat in registry.stats_for(mode, overrides):
        if kind in stat.scopes:
            for name, value in stat.compute(ctx, scope).items():
                if np.ndim(value) == 0:
                    scalars[f"{scope.key}/{name}"] = float(value)
                else:
                    arrays[f"{scope.key}/{name}"] = np.asarray(value)
    for signal in signals:
        values = ctx.values[signal.name]
        for agg in signal.aggregates:
            if kind in agg.scopes:
                scalars[f"{scope.key}/{agg.stat}"] = agg(values[scope.rows])
            if kind == "tier" and "twins" in agg.scopes and scope.control is not None:
                scalars[f"{scope.key}/twins_{agg.stat}"] = agg(values[scope.control])
        if signal.membership and scope.control is not None:
            member = np.asarray(values[scope.rows], dtype=np.float64)
            control = np.asarray(values[scope.control], dtype=np.float64)
            if signal.direction < 0:  # every contrast reads "higher = the members stand out more"
                member, control = -member, -control
            for contrast in registry.contrasts.values():
                if kind in contrast.scopes:
                    for suffix, value in contrast.compute(member, control).items():
                        scalars[f"{scope.key}/{signal.name}_{suffix}"] = float(value)
