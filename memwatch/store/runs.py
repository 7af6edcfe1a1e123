"""A history read back: its runs as arrays, every evaluation's record replayed, group series, transitions, timelines, the JSON report."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memwatch.engine.result import ExtractionResult
from memwatch.record import (
    DEFAULT_PAIRS,
    GROUP_ORDER,
    EvalRecord,
    ProbeTracker,
    build_record,
    finite_or_none,
    products_of,
)
from memwatch.signals import REGISTRY
from memwatch.signals.buckets import BUCKET_NAMES, bucket_signal, transition_matrix
from memwatch.store.history import HistoryError, HistoryStore

__all__ = ["History", "RunData", "report_dict", "resolve_history_path"]


def resolve_history_path(path: str | os.PathLike[str]) -> str:
    """A history file, or a directory holding one (<dir>/memwatch/history.sqlite or <dir>/history.sqlite)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        for candidate in (os.path.join(p, "memwatch", "history.sqlite"), os.path.join(p, "history.sqlite")):
            if os.path.isfile(candidate):
                return candidate
        raise HistoryError(
            f"no memwatch history under {p} (looked for memwatch/history.sqlite and history.sqlite)"
        )
    if not os.path.exists(p):
        raise HistoryError(f"no history at {p}: give a history file or a training output directory")
    return p


# Keys of a group's row that the tables of 0.1.0 had; every other statistic of the scope follows them.
_ROW_COUNTS = ("n", "extracted", "memorized")
_BOUNDARY = ("entropy_pre", "entropy_post", "boundary_jump", "entropy_profile")


@dataclass
class RunData:
    """One run's results as arrays: E evaluations (by step) x N probes (panel order). The core columns are typed
    arrays; `signals` holds the other registered signals the history stored; every table below comes from
    replaying the evaluations through the live record building (memwatch.record), so it matches what the live
    monitor logged."""

    run_id: int
    name: str
    source: str
    model: str | None
    config: dict[str, Any]
    steps: np.ndarray  # int64 [E]
    labels: list[str | None]  # e.g. checkpoint names of a scan
    ids: list[str]
    groups: np.ndarray  # object [N]
    metas: list[dict[str, Any]]
    tokens: list[list[int]]
    exact: np.ndarray  # bool [E, N]
    match_ratio: np.ndarray  # float [E, N] (NaN in mode "exact")
    prefix_match_len: np.ndarray  # int [E, N]
    edit_similarity: np.ndarray  # float [E, N]
    suffix_nll: np.ndarray  # float [E, N]
    near_tie: np.ndarray  # bool [E, N]
    exposure: np.ndarray  # float [E, N], NaN where not computed
    entropy: np.ndarray  # float32 [E, N, w + m]
    generated: np.ndarray | None  # int [E, N, m] or None; -2 where it differs and reveal_text was off
    specs: list[dict[str, Any]]
    wall_times: np.ndarray | None = None  # float [E]: when each evaluation ran (unix seconds)
    durations: np.ndarray | None = None  # float [E]: seconds each evaluation took (0 where unknown)
    signals: dict[str, np.ndarray] = field(default_factory=dict)  # other stored signals, float [E, N]
    created: float | None = None  # when the run started (unix seconds)
    status: str | None = None  # running, finished, interrupted, failed, stopped; None in older histories
    history: str = ""  # the file it was read from
    kept: list[dict[str, Any]] = field(
        default_factory=list
    )  # per evaluation: group statistics kept as numbers
    alerts: list[dict[str, Any]] = field(default_factory=list)  # the run's alerts (HistoryStore.alerts)
    _replayed: list[EvalRecord] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        # A few hundred characters whatever the panel: the arrays are for reading, not for printing.
        groups = self.group_names()
        counts = ", ".join(f"{_clip(g, 20)} {int((self.groups == g).sum())}" for g in groups[:_REPR_GROUPS])
        if len(groups) > _REPR_GROUPS:
            counts += f", +{len(groups) - _REPR_GROUPS} more groups"
        where = f"; {_clip_path(self.history)}" if self.history else ""
        return (
            f"RunData(run {self.run_id} {_clip(self.name, 48)!r}, {_clip(self.source, 12)}, "
            f"{_clip(self.status or 'status unknown', 14)}, {_evaluations(self.steps.tolist())}, "
            f"{len(self.ids)} probes ({counts}){where})"
        )

    def _repr_html_(self) -> str:
        """The run's part of `memwatch report --format html` (its charts and tables), shown by Jupyter."""
        from memwatch.posthoc.report import html_fragment, run_html

        return html_fragment([run_html(self)])

    @property
    def started(self) -> str:
        """When the run started, local time to the second ("" when unknown)."""
        if self.created is None:
            return ""
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))

    def describe(self) -> str:
        """The run in one line for report headers: source, start, size, and how it ended unless it finished."""
        parts = [self.source]
        if self.started:
            parts.append(f"started {self.started}")
        parts += [f"{len(self.steps)} evaluations", f"{len(self.ids)} probes"]
        if self.status not in (None, "finished"):
            parts.append(
                f"{self.status.upper()}" + (" before training finished" if self.status != "running" else "")
            )
        return ", ".join(parts)

    @property
    def memorized_threshold(self) -> float:
        return float(self.config.get("memorized_threshold", 1.0))

    @property
    def entropy_window(self) -> int:
        return int(self.specs[0]["entropy_window"]) if self.specs else 0

    @property
    def mode(self) -> str:
        return str(self.specs[-1].get("mode", "full")) if self.specs else "full"

    def settings(self) -> dict[str, Any]:
        """The run's definitions, as its records were built with."""
        return {
            "memorized_threshold": self.memorized_threshold,
            "boundary_width": int(self.config.get("boundary_width", 4)),
        }

    def group_names(self) -> list[str]:
        present = list(dict.fromkeys(self.groups.tolist()))
        return [g for g in GROUP_ORDER if g in present] + [g for g in present if g not in GROUP_ORDER]

    def result(self, e: int) -> ExtractionResult:
        """Evaluation e as the ExtractionResult it was recorded from."""
        spec = self.specs[e]
        m = int(spec["suffix_len"])
        ratio = None if np.isnan(self.match_ratio[e]).all() else self.match_ratio[e].astype(np.float32)
        count = None
        if ratio is not None:
            # The integer count back from the stored ratio c/m (exact: float32 c/m * m rounds to c for any m).
            count = np.rint(self.match_ratio[e] * m).astype(np.int64)
        sim = None if np.isnan(self.edit_similarity[e]).all() else self.edit_similarity[e].astype(np.float32)
        return ExtractionResult(
            prefix_len=int(spec["prefix_len"]),
            suffix_len=int(spec["suffix_len"]),
            entropy_window=int(spec["entropy_window"]),
            mode=str(spec.get("mode", "full")),
            generated=None if self.generated is None else self.generated[e],
            exact=self.exact[e],
            match_ratio=ratio,
            match_count=count,
            prefix_match_len=self.prefix_match_len[e],
            edit_similarity=sim,
            entropy=self.entropy[e],
            suffix_nll=self.suffix_nll[e].astype(np.float32),
            near_tie=self.near_tie[e],
        )

    def records(self, tracker: ProbeTracker | None = None) -> Iterator[tuple[int, EvalRecord]]:
        """(index, EvalRecord) per evaluation, replayed through the live record building (signals, transitions,
        boundary, dose-response, contrasts), advancing `tracker` (a fresh one by default)."""
        tracker = tracker or ProbeTracker(len(self.ids))
        k = int(self.specs[0]["prefix_len"]) if self.specs else 0
        m = int(self.specs[0]["suffix_len"]) if self.specs else 0
        window = np.array([t[: k + m] for t in self.tokens], dtype=np.int64).reshape(len(self.ids), k + m)
        for e, step in enumerate(self.steps.tolist()):
            result = self.result(e)
            extra = {"exposure": self.exposure[e]} if np.isfinite(self.exposure[e]).any() else {}
            record = build_record(
                step=step,
                wall_time=0.0 if self.wall_times is None else float(self.wall_times[e]),
                duration=0.0 if self.durations is None else float(self.durations[e]),
                spec=self.specs[e],
                probe_ids=self.ids,
                groups=self.groups,
                metas=self.metas,
                tokens=window,
                products=products_of(result, extra),
                preset={name: values[e] for name, values in self.signals.items()},
                tracker=tracker,
                settings=self.settings(),
                pairs=[tuple(p) for p in self.config.get("pairs", DEFAULT_PAIRS)],
                overrides=self.config.get("signals") or None,
                label=self.labels[e],
                result=result,
            )
            # What the replay cannot recompute (GroupStat.kept), as the live monitor computed it.
            for key, value in (self.kept[e] if e < len(self.kept) else {}).items():
                if isinstance(value, list):
                    record.arrays.setdefault(key, np.asarray(value, dtype=np.float64))
                else:
                    record.scalars.setdefault(key, float(value))
            yield e, record

    def replayed(self) -> list[EvalRecord]:
        """Every evaluation's record (replayed once and kept)."""
        if self._replayed is None:
            self._replayed = [r for _e, r in self.records()]
        return self._replayed

    def values(self, signal: str) -> np.ndarray:
        """One signal of every probe at every evaluation, [E, N] (stored or recomputed by the replay)."""
        n = len(self.ids)
        rows = [r.values.get(signal, np.full(n, np.nan)) for r in self.replayed()]
        return np.stack(rows) if rows else np.zeros((0, n))

    def memorized(self) -> np.ndarray:
        """bool [E, N]: exact, or at least memorized_threshold of the suffix reproduced."""
        return (
            self.values("memorized").astype(bool) if len(self.steps) else np.zeros((0, len(self.ids)), bool)
        )

    def buckets(self) -> np.ndarray:
        """int [E, N] bucket indices (signals.buckets)."""
        if not len(self.steps):
            return np.zeros((0, len(self.ids)), dtype=np.int64)
        return self.values(bucket_signal(self.mode)).astype(np.int64)

    def rows(self, group: str) -> np.ndarray:
        return np.flatnonzero(self.groups == group)

    def group_series(self) -> list[dict[str, Any]]:
        """Per evaluation and group, every group statistic the live monitor logged: counts, rates and means, the
        buckets, the events, and the entropy across the boundary per bucket (`boundary`)."""
        # Every group aggregate the registry knows is a key in every row, null where this run's mode does not define
        # it (exact mode has no match ratio): a reader's schema does not change with the mode.
        known = dict.fromkeys(
            a.stat for s in REGISTRY.signals.values() for a in s.aggregates if "group" in a.scopes
        )
        out = []
        for record in self.replayed():
            for scope in record.scopes:
                if scope.kind == "group":
                    row = {"step": record.step, "group": scope.key, **scope_row(record, scope.key)}
                    out.append({**row, **{k: None for k in known if k not in row}})
        return out

    def contrasts(self) -> list[dict[str, Any]]:
        """Per evaluation and pair (a member group against its control; a canary tier against its twins), every
        contrast statistic of every membership signal (<signal>_<statistic>), and `notes` saying what was
        refused (a TPR at a low FPR with too few controls)."""
        from memwatch.signals.membership import MIN_CONTROLS

        heads = tuple(f"{s.name}_" for s in REGISTRY.signals.values() if s.membership)
        out = []
        for r in self.replayed():
            for s in r.scopes:
                if s.kind not in ("pair", "tier"):
                    continue
                stats = r.scope(s.key)
                row: dict[str, Any] = {"step": r.step, "pair": s.key, "kind": s.kind}
                row["n"] = finite_or_none(stats.get("n"))
                row["control_n"] = len(s.control) if s.control is not None else None
                row.update({k: finite_or_none(v) for k, v in stats.items() if k.startswith(heads)})
                controls = row["control_n"] or 0
                row["notes"] = [
                    f"TPR at {label.replace('pct', '%')} FPR refused: {controls} controls, fewer than the {need} it needs"
                    for label, need in MIN_CONTROLS.items()
                    if controls < need
                ]
                out.append(row)
        return out

    def transitions(self, from_index: int | None = None, to_index: int | None = None) -> list[dict[str, Any]]:
        """Transition matrices per group: between consecutive evaluations (default), or between two given ones."""
        buckets = self.buckets()
        pairs: Sequence[tuple[int, int]]
        if from_index is None and to_index is None:
            pairs = [(e - 1, e) for e in range(1, len(self.steps))]
        else:
            pairs = [
                (
                    from_index if from_index is not None else 0,
                    to_index if to_index is not None else len(self.steps) - 1,
                )
            ]
        out = []
        for a, b in pairs:
            for g in self.group_names():
                r = self.rows(g)
                out.append(
                    {
                        "from_step": int(self.steps[a]),
                        "to_step": int(self.steps[b]),
                        "group": g,
                        "matrix": transition_matrix(buckets[a, r], buckets[b, r]).tolist(),
                    }
                )
        return out

    def timelines(self) -> list[dict[str, Any]]:
        """Per probe: first step memorized, steps where it was forgotten and re-memorized."""
        mem = self.memorized()
        out = []
        for i, pid in enumerate(self.ids):
            col = mem[:, i]
            first = np.flatnonzero(col)
            forgotten = [int(self.steps[e]) for e in range(1, len(col)) if col[e - 1] and not col[e]]
            again = [
                int(self.steps[e]) for e in range(1, len(col)) if col[e] and not col[e - 1] and col[:e].any()
            ]
            out.append(
                {
                    "id": pid,
                    "group": self.groups[i],
                    "first_memorized_step": int(self.steps[first[0]]) if first.size else None,
                    "forgotten_steps": forgotten,
                    "rememorized_steps": again,
                    "memorized_at_end": bool(col[-1]) if col.size else False,
                    # A canary's manifest id beside its probe id: alerts name both, so both find it here.
                    **{
                        key: self.metas[i][key]
                        for key in ("canary_id", "repetitions")
                        if key in self.metas[i]
                    },
                }
            )
        return out

    def first_memorized(self) -> np.ndarray:
        """int64 [N]: the first step each probe was memorized, -1 if never."""
        mem = self.memorized()
        out = np.full(len(self.ids), -1, dtype=np.int64)
        if len(self.steps):
            any_mem = mem.any(axis=0)
            out[any_mem] = self.steps[np.argmax(mem, axis=0)[any_mem]]
        return out

    def tiers(self) -> list[dict[str, Any]]:
        """Canary dose-response per evaluation and repetition tier (inserted canaries against their twins)."""
        return [row for record in self.replayed() for row in record.tiers]

    def entropy_profiles(self, index: int = -1) -> dict[str, dict[str, Any]]:
        """Mean entropy profile and boundary stats per group and bucket at one evaluation (default: the last)."""
        if not len(self.steps):
            return {}
        record = self.replayed()[index]
        return {s.key: scope_row(record, s.key)["boundary"] for s in record.scopes if s.kind == "group"}

    def index_of(self, step: int) -> int:
        """The index of the evaluation at training step `step`. A negative `step` counts evaluations from the end
        as a list index does (-1: the last; training steps are never negative)."""
        n = len(self.steps)
        if step < 0 and -n <= step:
            return n + step
        hits = np.flatnonzero(self.steps == step)
        if step < 0 or not len(hits):
            raise ValueError(
                f"run {self.name!r} has no evaluation at step {step}; steps: {self.steps.tolist()}"
            )
        return int(hits[0])

    # --- DataFrames (pandas, imported here only: pip install 'memwatch[notebook]') ----------------------------------

    def series_frame(self) -> Any:
        """group_series() as a DataFrame: one row per (step, group) with every group statistic, counts as int64
        and statistics as float64 (NaN where the run does not define one), and the bucket counts as int64 columns
        `buckets/<bucket>`. The entropy across the boundary per bucket is entropy_profiles()."""
        pd = _pandas("RunData.series_frame")
        rows = []
        for r in self.group_series():
            flat = {k: v for k, v in r.items() if k not in ("buckets", "boundary", "ngram_profile")}
            flat.update({f"buckets/{b}": count for b, count in r["buckets"].items()})
            rows.append(flat)
        return _frame(pd, rows, ["step", "group", *_ROW_COUNTS])

    def tiers_frame(self) -> Any:
        """tiers() as a DataFrame, the canaries' dose-response: one row per (step, repetition tier) with its
        inserted canaries' and never-inserted twins' counts (int64), extraction rates, median exposures and
        membership contrasts (float64), and `first_memorized_step` (Int64, <NA> if none yet)."""
        pd = _pandas("RunData.tiers_frame")
        return _frame(pd, self.tiers(), ["step", "repetitions", "inserted", "twins"])

    def timelines_frame(self) -> Any:
        """timelines() as a DataFrame: one row per probe (panel order) with its id and group, the first step it
        was memorized (Int64, <NA> if never), the steps it was forgotten and re-memorized at (lists), whether it
        is memorized at the end (bool), and a canary's `canary_id` and `repetitions` (<NA> for other probes)."""
        pd = _pandas("RunData.timelines_frame")
        return _frame(
            pd,
            self.timelines(),
            ["id", "group", "first_memorized_step", "forgotten_steps", "rememorized_steps"],
        )

    def transitions_frame(
        self, from_step: int | None = None, to_step: int | None = None, group: str | None = None
    ) -> Any:
        """The bucket transition matrix between two evaluations as a square int64 DataFrame: rows the buckets at
        `from_step` (default: the first evaluation), columns those at `to_step` (default: the last), counting the
        probes of `group` (default: every group). Steps as in index_of (-1: the last); `attrs` holds from_step,
        to_step and group."""
        pd = _pandas("RunData.transitions_frame")
        if not len(self.steps):
            raise ValueError(f"run {self.name!r} has no evaluations yet")
        if group is not None and group not in self.group_names():
            raise ValueError(f"run {self.name!r} has no group {group!r}; groups: {self.group_names()}")
        a = self.index_of(from_step) if from_step is not None else 0
        b = self.index_of(to_step) if to_step is not None else len(self.steps) - 1
        matrices = [np.array(t["matrix"]) for t in self.transitions(a, b) if group in (None, t["group"])]
        frame = pd.DataFrame(
            np.sum(matrices, axis=0).astype(np.int64),
            index=pd.Index(list(BUCKET_NAMES), name="from"),
            columns=pd.Index(list(BUCKET_NAMES), name="to"),
        )
        frame.attrs.update(from_step=int(self.steps[a]), to_step=int(self.steps[b]), group=group)
        return frame


# The repr's bounds (under 500 characters in all): a run's first groups, a history's latest runs with their names
# clipped to lines of about _REPR_LINE characters, paths clipped.
_REPR_GROUPS = 5
_REPR_RUNS = 3
_REPR_LINE = 100


def _clip(text: str, most: int) -> str:
    # The middle goes: names differ at their ends as often as at their starts (run-1, run-2; group-a, group-b).
    if len(text) <= most:
        return text
    head = (most - 1) // 2
    return text[:head] + "…" + text[len(text) - (most - 1 - head) :]


def _clip_path(path: str, most: int = 100) -> str:
    # The file's end names it (run-x/memwatch/history.sqlite): the start is what goes.
    return path if len(path) <= most else "…" + path[-(most - 1) :]


def _evaluations(steps: Sequence[int]) -> str:
    if not steps:
        return "no evaluations"
    at = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}..{steps[-1]}"
    return f"{len(steps)} evaluation{'s' if len(steps) > 1 else ''} at {at}"


def _pandas(what: str) -> Any:
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError(f"{what} needs pandas: pip install 'memwatch[notebook]'") from exc
    return pd


def _frame(pd: Any, rows: Sequence[dict[str, Any]], first: Sequence[str]) -> Any:
    """Report rows as a DataFrame, `first` columns in front, each column's dtype from its values: whole numbers
    int64 (Int64 where some are missing), other numbers float64 (None as NaN), booleans bool, lists as they are."""
    columns = list(
        dict.fromkeys([*(c for c in first if any(c in r for r in rows)), *(k for r in rows for k in r)])
    )
    frame = pd.DataFrame.from_records([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    for c in columns:
        values = [r.get(c) for r in rows]
        given = [v for v in values if v is not None]
        if given and all(isinstance(v, bool | np.bool_) for v in given):
            frame[c] = frame[c].astype(bool if len(given) == len(values) else "boolean")
        elif given and all(isinstance(v, int | np.integer) for v in given):
            frame[c] = frame[c].astype(np.int64 if len(given) == len(values) else "Int64")
        elif all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in given):
            # Statistics: NaN where undefined, a whole column of it for one this run never defines.
            frame[c] = frame[c].astype(np.float64)
    return frame


def scope_row(record: EvalRecord, key: str) -> dict[str, Any]:
    """A group's statistics at one evaluation as a report row: the counts, then every scalar by name (NaN as
    None), the bucket counts as `buckets`, and per bucket the entropy across the boundary as `boundary`
    ({bucket: {n, pre, post, jump, profile}}; mode exact's teacher-forced ones under the same keys)."""
    stats = record.scope(key)
    row: dict[str, Any] = {name: int(stats.get(name, 0)) for name in _ROW_COUNTS}
    buckets = bucket_signal(record.mode)
    boundary: dict[str, dict[str, Any]] = {}
    for name, value in stats.items():
        head, _, bucket = name.partition("/")
        if name in _ROW_COUNTS or head in (buckets, "bucket", "prefix_bucket"):
            continue
        if head.removeprefix("tf_") in _BOUNDARY:
            short = {"entropy_pre": "pre", "entropy_post": "post", "boundary_jump": "jump"}[
                head.removeprefix("tf_")
            ]
            boundary.setdefault(bucket, {})[short] = finite_or_none(value)
            continue
        row[name] = finite_or_none(value)
    row["buckets"] = {b: int(stats.get(f"{buckets}/{b}", 0)) for b in BUCKET_NAMES}
    head = f"{key}/{'' if record.mode == 'full' else 'tf_'}entropy_profile/"
    for name, profile in record.arrays.items():
        if name.startswith(head):
            bucket = name[len(head) :]
            entry = boundary.setdefault(bucket, {})
            entry["n"] = row["buckets"].get(bucket, 0)
            entry["profile"] = [round(float(v), 6) for v in profile]
    row["boundary"] = {b: boundary[b] for b in BUCKET_NAMES if b in boundary}
    # The n-gram profile across the boundary per bucket (the training data's counts; with MonitorConfig.ngrams).
    head = f"{key}/{'' if record.mode == 'full' else 'tf_'}ngram_profile/"
    profiles = {
        name[len(head) :]: [round(float(v), 6) for v in profile]
        for name, profile in record.arrays.items()
        if name.startswith(head)
    }
    if profiles:
        row["ngram_profile"] = {b: profiles[b] for b in BUCKET_NAMES if b in profiles}
    return row


class History:
    """A memwatch history for notebooks and scripts: runs as numpy arrays, and the report tables."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = resolve_history_path(path)
        self.store = HistoryStore(self.path, readonly=True)

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        # The latest runs in a line each, whatever the panel and however many runs: never the data.
        try:
            runs = self.store.runs()
            lines = []
            for info in runs[-_REPR_RUNS:]:
                steps = [ev["step"] for ev in self.store.evals(info["run_id"])]
                rest = (
                    f": {_clip(info['source'] or '', 12)}, {_clip(info['status'] or 'status unknown', 14)}, "
                    f"{_evaluations(steps)}, {len(self.store.positions(info['run_id']))} probes"
                )
                head = f"  run {info['run_id']} "
                # The name gets the room the line has left (and at least 12 characters of it).
                room = max(12, min(40, _REPR_LINE - len(head) - len(rest) - 2))
                lines.append(f"{head}{_clip(info['name'], room)!r}{rest}")
        except Exception as exc:  # a repr never raises: a closed or damaged file says so
            return f"History({_clip_path(self.path)!r}, unreadable: {_clip(str(exc), 100)})"
        earlier = len(runs) - _REPR_RUNS
        more = [f"  (and {earlier} earlier run{'' if earlier == 1 else 's'})"] if earlier > 0 else []
        head = f"History({_clip_path(self.path)!r}, {len(runs)} run{'' if len(runs) == 1 else 's'}"
        return "\n".join([head + (":" if runs else ")"), *more, *lines]) + (")" if runs else "")

    def _repr_html_(self) -> str:
        """Every run's part of `memwatch report --format html` (charts and tables), shown by Jupyter."""
        from memwatch.posthoc.report import html_fragment, run_html

        sections = [run_html(run) for run in self.all_runs()] or ["<p>No runs yet.</p>"]
        return html_fragment(sections, heading=f"memwatch history {self.path}")

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.store.runs()

    def require_runs(self) -> list[dict[str, Any]]:
        """The runs; HistoryError if there is none (a file created by a monitor that never evaluated)."""
        runs = self.runs
        if not runs:
            raise HistoryError(f"{self.path} holds no runs yet")
        return runs

    def run(self, which: int | str | None = None, spec: dict[str, Any] | None = None) -> RunData:
        """A run by id or name (default: the latest), with its evaluations of one spec (default: the latest one)."""
        runs = self.require_runs()
        if which is None:
            info = runs[-1]
        else:
            matches = [r for r in runs if r["run_id"] == which or r["name"] == which]
            if not matches:
                names = ", ".join(f"{r['run_id']}:{r['name']}" for r in runs)
                raise HistoryError(f"no run {which!r} in {self.path}; runs: {names}")
            info = matches[-1]
        return self._load(info, spec)

    def _load(self, info: dict[str, Any], spec: dict[str, Any] | None = None) -> RunData:
        from memwatch.store.history import decode_floats, decode_ints

        panel = self.store.panel(info["run_id"])
        evals = self.store.evals(info["run_id"])
        if evals and spec is None:
            spec = evals[-1]["spec"]  # a run measured with several specs: the latest one, like with like
        evals = [e for e in evals if spec is None or e["spec"] == spec]
        ids = [p["id"] for p in panel]
        index = {pid: i for i, pid in enumerate(ids)}
        e, n = len(evals), len(ids)
        w_m = (evals[0]["entropy_window"] + evals[0]["suffix_len"]) if evals else 0
        m = evals[0]["suffix_len"] if evals else 0
        exact = np.zeros((e, n), bool)
        ratio = np.full((e, n), np.nan)
        pml = np.zeros((e, n), np.int64)
        sim = np.full((e, n), np.nan)
        nll = np.full((e, n), np.nan)
        tie = np.zeros((e, n), bool)
        exposure = np.full((e, n), np.nan)
        entropy = np.full((e, n, w_m), np.nan, dtype=np.float32)
        generated = np.zeros((e, n, m), np.int64)
        any_generated = False
        signals: dict[str, np.ndarray] = {}
        for ei, ev in enumerate(evals):
            for name, values in self.store.signal_values(ev["eval_id"]).items():
                signals.setdefault(name, np.full((e, n), np.nan))[ei, : len(values)] = values
            for row in self.store.results(ev["eval_id"]):
                i = index.get(row["probe_id"])
                if i is None:
                    continue
                exact[ei, i] = bool(row["exact"])
                pml[ei, i] = row["prefix_match_len"]
                nll[ei, i] = row["suffix_nll"]
                tie[ei, i] = bool(row["near_tie"])
                if row["match_ratio"] is not None:
                    ratio[ei, i] = row["match_ratio"]
                if row["edit_similarity"] is not None:
                    sim[ei, i] = row["edit_similarity"]
                if row["exposure"] is not None:
                    exposure[ei, i] = row["exposure"]
                ent = decode_floats(row["entropy"])
                if ent is not None and len(ent) == w_m:
                    entropy[ei, i] = ent
                gen = decode_ints(row["generated"])
                if gen is not None and len(gen) == m:
                    generated[ei, i] = gen
                    any_generated = True
        if any_generated:  # the history keeps what matches the probe's suffix in the probes table only
            from memwatch.store.history import reveal_matches

            k = evals[0]["prefix_len"]
            suffixes = np.array([p["tokens"][k : k + m] for p in panel], dtype=np.int64)  # [N, m]
            generated = reveal_matches(generated, suffixes[None])
        return RunData(
            run_id=info["run_id"],
            name=info["name"],
            source=info["source"],
            model=info["model"],
            config=info["config"],
            steps=np.array([ev["step"] for ev in evals], dtype=np.int64),
            labels=[ev.get("label") for ev in evals],
            ids=ids,
            groups=np.array([p["group"] for p in panel], dtype=object),
            metas=[p["meta"] for p in panel],
            tokens=[p["tokens"] for p in panel],
            exact=exact,
            match_ratio=ratio,
            prefix_match_len=pml,
            edit_similarity=sim,
            suffix_nll=nll,
            near_tie=tie,
            exposure=exposure,
            entropy=entropy,
            generated=generated if any_generated else None,
            specs=[ev["spec"] for ev in evals],
            wall_times=np.array([ev["wall_time"] or 0.0 for ev in evals], dtype=np.float64),
            durations=np.array([ev["duration"] or 0.0 for ev in evals], dtype=np.float64),
            signals=signals,
            created=info.get("created"),
            history=self.path,
            kept=[self.store.kept_stats(ev["eval_id"]) for ev in evals],
            status=info.get("status"),
            alerts=self.store.alerts(info["run_id"]),
        )

    def all_runs(self) -> list[RunData]:
        return [self._load(info) for info in self.runs]

    def to_pandas(self) -> Any:
        """All runs' per-probe results as one long pandas DataFrame (the columns of `memwatch report --format csv`).

        pandas is optional: pip install 'memwatch[pandas]'.
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "History.to_pandas needs pandas: pip install 'memwatch[pandas]' (or pandas)"
            ) from exc
        rows = [row for run in self.all_runs() for row in probe_rows(run)]
        return pd.DataFrame.from_records(rows, columns=list(rows[0]) if rows else list(PROBE_COLUMNS))


PROBE_COLUMNS = ("run_id", "run", "step", "label", "probe_id", "group", "repetitions")


def probe_rows(run: RunData) -> Iterator[dict[str, Any]]:
    """One row per (evaluation, probe): who and when, then every per-probe signal of the run (stored, or recomputed
    by the replay), booleans as 0/1 and what was not measured as None. The CSV report and to_pandas."""
    names = [s.name for s in REGISTRY if any(s.name in r.values for r in run.replayed())]
    for record in run.replayed():
        columns = {name: record.values.get(name) for name in names}
        for i, pid in enumerate(run.ids):
            row: dict[str, Any] = {
                "run_id": run.run_id,
                "run": run.name,
                "step": record.step,
                "label": record.label or "",
                "probe_id": pid,
                "group": run.groups[i],
                "repetitions": run.metas[i].get("repetitions"),
            }
            for name, values in columns.items():
                v = None if values is None else values[i]
                row[name] = int(v) if isinstance(v, bool | np.bool_) else finite_or_none(v)
            yield row


def report_dict(history: History) -> dict[str, Any]:
    """The JSON report: runs, per-group series, transitions between consecutive evaluations, probe timelines."""
    runs = history.all_runs()
    out: dict[str, Any] = {
        "history": history.path,
        "runs": [
            {
                "run_id": r.run_id,
                "name": r.name,
                "source": r.source,
                "model": r.model,
                "started": r.started,
                "status": r.status,
                "evaluations": len(r.steps),
                "probes": len(r.ids),
            }
            for r in runs
        ],
        "evals": [],
        "contrasts": [],
        "transitions": [],
        "probes": [],
        "canaries": {"tiers": []},
        "alerts": [
            {k: a[k] for k in ("run_id", "step", "rule", "group", "probe_ids", "message", "action")}
            for a in history.store.alerts()
        ],
    }
    for r in runs:
        out["canaries"]["tiers"].extend({"run_id": r.run_id, **row} for row in r.tiers())
        out["evals"].extend({"run_id": r.run_id, **row} for row in r.group_series())
        out["contrasts"].extend({"run_id": r.run_id, **row} for row in r.contrasts())
        out["transitions"].extend({"run_id": r.run_id, **row} for row in r.transitions())
        out["probes"].extend({"run_id": r.run_id, **row} for row in r.timelines())
    return out
