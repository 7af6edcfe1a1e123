"""The signal registry: per-probe signals, their group aggregates, group statistics and contrasts, declared once."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "REGISTRY",
    "Aggregate",
    "Context",
    "Contrast",
    "GroupStat",
    "Registry",
    "Scope",
    "Signal",
    "register_contrast",
    "register_group_stat",
    "register_signal",
]

MODES = ("full", "exact")
SCOPE_KINDS = ("group", "tier", "twins", "pair")
_HOW: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda v: float(np.mean(v)),
    "median": lambda v: float(np.median(v)),
    "sum": lambda v: float(np.sum(v)),
    "rate": lambda v: float(np.mean(v)),
    "max": lambda v: float(np.max(v)),
    "min": lambda v: float(np.min(v)),
}


class Context(Protocol):
    """What a signal's compute sees (record.Context implements it): the products of one evaluation and the panel.

    products: engine and measurement products by name (ExtractionResult fields, exposure, ...), [N, ...] arrays or
    None when not computed; values: the signals computed so far, [N]; tokens: the panel's windows [N, k + m];
    groups: object [N]; metas: per-probe metadata; k, m, w: the spec; settings: the run's definitions
    (memorized_threshold, boundary_width, ...)."""

    products: Mapping[str, Any]
    values: Mapping[str, np.ndarray]
    tokens: np.ndarray
    groups: np.ndarray
    metas: Sequence[Mapping[str, Any]]
    k: int
    m: int
    w: int
    mode: str
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class Aggregate:
    """A group statistic made from one signal's values over a scope's rows: `stat` = how(values), NaN values left
    out (a signal computed for some probes only, e.g. exposure for canaries).

    scopes: where it appears: "group" (every group), "tier" (a canary tier's inserted canaries), "twins" (the
    tier's never-inserted twins, as twins_<stat>), "pair" (not for aggregates). headline: shown in the tables of
    the text/HTML reports and `compare` (every stat is in JSON, CSV, TensorBoard and alerts regardless), titled
    `label` and printed with `fmt`. tracked: forwarded to the run's experiment trackers (W&B, MLflow, ...) by
    default, in its group and tier scopes (MonitorConfig.trackers="headline"): the few numbers a loss chart sits
    beside."""

    stat: str
    how: str = "mean"
    scopes: tuple[str, ...] = ("group",)
    headline: bool = True
    meaning: str = ""
    label: str = ""  # the column title in report tables (default: the stat's name)
    fmt: str = ".3f"  # how tables print it: ".1%" for rates, ".0f" for counts
    tracked: bool = False

    @property
    def title(self) -> str:
        return self.label or self.stat

    def __post_init__(self) -> None:
        if self.how not in _HOW:
            raise ValueError(f"Aggregate.how must be one of {sorted(_HOW)}; got {self.how!r}")
        bad = [s for s in self.scopes if s not in SCOPE_KINDS[:3]]
        if bad:
            raise ValueError(f"Aggregate.scopes must be among {SCOPE_KINDS[:3]}; got {bad}")

    def __call__(self, values: np.ndarray) -> float:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        return _HOW[self.how](v) if v.size else math.nan


@dataclass(frozen=True)
class Signal:
    """A per-probe number, computed at every evaluation.

    name: its key everywhere (history catalog, CSV column, TensorBoard, alert rules); meaning: one line; unit;
    direction: +1 higher = more memorized / member-like, -1 lower = more, 0 neither; needs: the engine or
    measurement products it reads (the engine computes the union of what enabled signals need); after: signals it
    reads from ctx.values when they are on (computed first); modes: the extraction modes it is defined in; version: bumped when its definition
    changes (the history keeps name and version); compute(ctx) -> [N] float/int/bool; stored: kept in the history
    (False: derived from stored ones, recomputed when a history is replayed); aggregates: its group statistics;
    histogram: TensorBoard histogram per group; membership: takes part in contrasts (member vs control AUC ...);
    default: on unless MonitorConfig(signals={name: False}); requires: (module, extra) of an optional package it
    imports, checked when a config switches it on (a clear error naming `pip install memwatch[extra]`)."""

    name: str
    meaning: str
    unit: str
    compute: Callable[[Any], np.ndarray]
    direction: int = 0
    needs: frozenset[str] = frozenset()
    after: tuple[str, ...] = ()
    modes: tuple[str, ...] = MODES
    version: int = 1
    stored: bool = True
    aggregates: tuple[Aggregate, ...] = ()
    histogram: bool = False
    membership: bool = False
    default: bool = True
    requires: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "~" in self.name:
            raise ValueError(f"a signal name is a non-empty word without '/' or '~'; got {self.name!r}")
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"Signal.direction must be -1, 0 or +1; got {self.direction!r}")
        if not set(self.modes) <= set(MODES) or not self.modes:
            raise ValueError(f"Signal.modes must be among {MODES}; got {self.modes!r}")
        object.__setattr__(self, "needs", frozenset(self.needs))


@dataclass(frozen=True)
class Scope:
    """Where group statistics are computed: a group, a canary tier (inserted canaries of r repetitions against
    their twins), or a pair (a member group against its control). `key` prefixes its statistics
    (train/extraction_rate, canaries/4x/median_exposure, train~heldout/loss_auc)."""

    kind: str  # "group", "tier" or "pair"
    key: str
    rows: np.ndarray  # panel rows of the group, the tier's inserted canaries, or the pair's members
    control: np.ndarray | None = None  # the tier's twins, or the pair's control rows
    label: str = ""  # group name, "4x", or "train~heldout"


@dataclass(frozen=True)
class GroupStat:
    """A statistic that is not one signal's aggregate (bucket counts, entropy across the boundary, transitions).

    name: its pattern as documented (bucket/<bucket>); compute(ctx, scope) -> {stat name: float} scalars and
    {stat name: array} vectors (profiles, matrices) in `arrays`; meaning, unit; scopes: the scope kinds it applies
    to; needs/after/modes as for signals; headline: shown in the report tables; kind: "scalar", "image" (an
    entropy-profile picture in TensorBoard) or "matrix" (reports only)."""

    name: str
    meaning: str
    unit: str
    compute: Callable[[Any, Scope], Mapping[str, Any]]
    scopes: tuple[str, ...] = ("group",)
    needs: frozenset[str] = frozenset()
    after: tuple[str, ...] = ()
    modes: tuple[str, ...] = MODES
    headline: bool = False
    kind: str = "scalar"
    # What it writes, for the documentation: (name pattern, kind, meaning); default: one output, its own name.
    outputs: tuple[tuple[str, str, str], ...] = ()
    # Its numbers cannot be recomputed from what the history stores (they need per-token products it does not
    # keep): the history keeps the numbers themselves, and a replay reads them back.
    kept: bool = False

    @property
    def switch(self) -> str:
        """The name that switches it in MonitorConfig.signals: its name before any "/<...>" (boundary)."""
        return self.name.split("/<", 1)[0]

    def owns(self, stat: str) -> bool:
        """Whether `stat` (a record key's part after the scope: ngram_pre/exact) is one of its outputs."""
        patterns = ("[^/]+".join(map(re.escape, re.split(r"<[^>]+>", name))) for name, _k, _m in self.outputs)
        return any(re.fullmatch(p, stat) for p in patterns)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", frozenset(self.needs))
        if not self.outputs:
            object.__setattr__(self, "outputs", ((self.name, self.kind, self.meaning),))


@dataclass(frozen=True)
class Contrast:
    """A statistic between a member group and its control, for every membership signal: compute(member values,
    control values, direction) -> {suffix: float}, keys <signal>_<suffix> (loss_auc, loss_tpr@1%fpr, ...).

    For a signal with direction -1 (lower = more member-like) the contrast receives the values negated, so every
    contrast reads "higher = the members stand out more"."""

    name: str
    meaning: str
    compute: Callable[[np.ndarray, np.ndarray], Mapping[str, float]]
    scopes: tuple[str, ...] = ("pair", "tier")
    headline: bool = True
    # What it gives, for the documentation: (key suffix, meaning); default: one output, its own name.
    outputs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.outputs:
            object.__setattr__(self, "outputs", ((self.name, self.meaning),))


@dataclass
class Registry:
    """Every signal, group statistic and contrast by name; the monitor, the history, every sink and report and the
    alert rules iterate it, so a new number is one module that registers itself."""

    signals: dict[str, Signal] = field(default_factory=dict)
    group_stats: dict[str, GroupStat] = field(default_factory=dict)
    contrasts: dict[str, Contrast] = field(default_factory=dict)

    def add(self, item: Signal | GroupStat | Contrast, *, replace: bool = False) -> None:
        table: dict[str, Any]
        if isinstance(item, Signal):
            table = self.signals
        elif isinstance(item, GroupStat):
            table = self.group_stats
        elif isinstance(item, Contrast):
            table = self.contrasts
        else:
            raise TypeError(f"the registry holds Signal, GroupStat and Contrast; got {type(item).__name__}")
        if item.name in table and not replace and table[item.name] is not item:
            raise ValueError(f"{type(item).__name__} {item.name!r} is already registered")
        table[item.name] = item

    def remove(self, name: str) -> None:
        for table in (self.signals, self.group_stats, self.contrasts):
            table.pop(name, None)

    def enabled(self, overrides: Mapping[str, bool] | None = None, mode: str = "full") -> list[Signal]:
        """The signals on for a run (defaults, switched by `overrides`), defined in `mode`, in dependency order."""
        overrides = overrides or {}
        on = {n: s for n, s in self.signals.items() if overrides.get(n, s.default) and mode in s.modes}
        ordered: list[Signal] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in seen:
                return
            if name in chain:
                raise ValueError(f"signals depend on each other in a circle: {' -> '.join((*chain, name))}")
            signal = on[name]
            for dep in signal.after:
                if dep in on:  # a signal that is off (or not defined in this mode) is simply absent
                    visit(dep, (*chain, name))
            seen.add(name)
            ordered.append(signal)

        for name in on:
            visit(name, ())
        return ordered

    def headline(self, mode: str = "full") -> list[Aggregate]:
        """The group aggregates the report tables show, in registration order."""
        return [
            a
            for s in self.signals.values()
            if mode in s.modes
            for a in s.aggregates
            if a.headline and "group" in a.scopes
        ]

    def stats_for(self, mode: str, overrides: Mapping[str, bool] | None = None) -> list[GroupStat]:
        """The group statistics defined in `mode` and not switched off by `overrides` (by GroupStat.switch)."""
        overrides = overrides or {}
        return [g for g in self.group_stats.values() if mode in g.modes and overrides.get(g.switch, True)]

    def products(self, overrides: Mapping[str, bool] | None = None, mode: str = "full") -> frozenset[str]:
        """The engine and measurement products the enabled signals and statistics need."""
        needed: set[str] = set()
        for s in self.enabled(overrides, mode):
            needed |= s.needs
        for g in self.stats_for(mode, overrides):
            needed |= g.needs
        return frozenset(needed)

    def switches(self) -> list[str]:
        """Every name MonitorConfig.signals accepts: the signals and the group statistics' switches."""
        return sorted({*self.signals, *(g.switch for g in self.group_stats.values())})

    def check_names(self, names: Iterable[str]) -> None:
        unknown = sorted(set(names) - set(self.switches()))
        if unknown:
            raise ValueError(f"unknown signal(s) {unknown}; registered: {self.switches()}")

    def __iter__(self) -> Iterator[Signal]:
        return iter(self.signals.values())


REGISTRY = Registry()


def register_signal(signal: Signal | None = None, /, **fields: Any) -> Any:
    """Register a Signal. As a call, register_signal(Signal(...)); as a decorator of the compute function,
    @register_signal(name=..., meaning=..., unit=..., ...). Returns what it was given."""
    if signal is not None:
        REGISTRY.add(signal)
        return signal

    def decorate(compute: Callable[[Any], np.ndarray]) -> Callable[[Any], np.ndarray]:
        REGISTRY.add(Signal(compute=compute, **fields))
        return compute

    return decorate


def register_group_stat(stat: GroupStat) -> GroupStat:
    REGISTRY.add(stat)
    return stat


def register_contrast(contrast: Contrast) -> Contrast:
    REGISTRY.add(contrast)
    return contrast
