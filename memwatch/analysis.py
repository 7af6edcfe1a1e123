"""Post-hoc queries over a history: per-run arrays, group series, transitions, probe timelines, reports."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import metrics
from .evaluation import EvalRecord, ProbeTracker, build_record, result_buckets
from .history import HistoryError, HistoryStore
from .result import ExtractionResult

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


def _nan_mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return float(values.mean()) if values.size else math.nan


def _nan_median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


@dataclass
class RunData:
    """One run's results as arrays: E evaluations (by step) x N probes (panel order)."""

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
    generated: np.ndarray | None  # int [E, N, m] or None
    specs: list[dict[str, Any]]
    wall_times: np.ndarray | None = None  # float [E]: when each evaluation ran (unix seconds)
    durations: np.ndarray | None = None  # float [E]: seconds each evaluation took (0 where unknown)

    @property
    def memorized_threshold(self) -> float:
        return float(self.config.get("memorized_threshold", 1.0))

    @property
    def entropy_window(self) -> int:
        return int(self.specs[0]["entropy_window"]) if self.specs else 0

    def group_names(self) -> list[str]:
        from .probes import GROUP_ORDER

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
        """(index, EvalRecord) per evaluation, replayed through the live record building (transitions, boundary,
        dose-response), advancing `tracker` (a fresh one by default)."""
        tracker = tracker or ProbeTracker(len(self.ids))
        for e, step in enumerate(self.steps.tolist()):
            exposure = self.exposure[e] if np.isfinite(self.exposure[e]).any() else None
            record = build_record(
                step=step,
                wall_time=0.0 if self.wall_times is None else float(self.wall_times[e]),
                duration=0.0 if self.durations is None else float(self.durations[e]),
                spec=self.specs[e],
                probe_ids=self.ids,
                groups=self.groups,
                metas=self.metas,
                result=self.result(e),
                tracker=tracker,
                memorized_threshold=self.memorized_threshold,
                boundary_width=int(self.config.get("boundary_width", 4)),
                exposure=exposure,
            )
            yield e, record

    def memorized(self) -> np.ndarray:
        """bool [E, N]: exact, or match ratio >= the run's memorized_threshold (metrics.memorized)."""
        if not len(self.steps):
            return np.zeros((0, len(self.ids)), dtype=bool)
        threshold = self.memorized_threshold
        return np.stack(
            [
                metrics.memorized(self.result(e).match_ratio, self.exact[e], threshold)
                for e in range(len(self.steps))
            ]
        )

    def buckets(self) -> np.ndarray:
        """int [E, N] bucket indices (evaluation.result_buckets)."""
        if not len(self.steps):
            return np.zeros((0, len(self.ids)), dtype=np.int64)
        return np.stack([result_buckets(self.result(e)) for e in range(len(self.steps))])

    def rows(self, group: str) -> np.ndarray:
        return np.flatnonzero(self.groups == group)

    def group_series(self) -> list[dict[str, Any]]:
        """Per evaluation and group: n, extracted, rates and means, bucket counts."""
        out = []
        buckets = self.buckets()
        mem = self.memorized()
        for e, step in enumerate(self.steps.tolist()):
            for g in self.group_names():
                r = self.rows(g)
                counts = np.bincount(buckets[e, r], minlength=len(metrics.BUCKET_NAMES))
                out.append(
                    {
                        "step": step,
                        "group": g,
                        "n": len(r),
                        "extracted": int(self.exact[e, r].sum()),
                        "memorized": int(mem[e, r].sum()),
                        "extraction_rate": float(self.exact[e, r].mean()) if len(r) else None,
                        "mean_match_ratio": _clean(_nan_mean(self.match_ratio[e, r])),
                        "mean_edit_similarity": _clean(_nan_mean(self.edit_similarity[e, r])),
                        "mean_suffix_nll": _clean(_nan_mean(self.suffix_nll[e, r])),
                        "median_exposure": _clean(_nan_median(self.exposure[e, r])),
                        "buckets": dict(zip(metrics.BUCKET_NAMES, counts.tolist(), strict=True)),
                    }
                )
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
                        "matrix": metrics.transition_matrix(buckets[a, r], buckets[b, r]).tolist(),
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
                    **(
                        {"repetitions": self.metas[i]["repetitions"]}
                        if "repetitions" in self.metas[i]
                        else {}
                    ),
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
        from .evaluation import tier_rows

        first = self.first_memorized()
        out = []
        for e, step in enumerate(self.steps.tolist()):
            ratio = None if np.isnan(self.match_ratio[e]).all() else self.match_ratio[e]
            out.extend(
                tier_rows(step, self.groups, self.metas, self.exact[e], ratio, self.exposure[e], first)
            )
        return out

    def entropy_profiles(self, index: int = -1) -> dict[str, dict[str, Any]]:
        """Mean entropy profile and boundary stats per group and bucket at one evaluation (default: the last)."""
        if not len(self.steps):
            return {}
        buckets = self.buckets()[index]
        width = int(self.config.get("boundary_width", 4))
        out: dict[str, dict[str, Any]] = {}
        for g in self.group_names():
            r = self.rows(g)
            per = {}
            for b, profile in metrics.entropy_profiles(self.entropy[index, r], buckets[r]).items():
                pre, post, jump = metrics.boundary_stats(profile, self.entropy_window, width)
                per[metrics.BUCKET_NAMES[b]] = {
                    "n": int((buckets[r] == b).sum()),
                    "profile": [round(float(v), 6) for v in profile],
                    "pre": _clean(pre),
                    "post": _clean(post),
                    "jump": _clean(jump),
                }
            out[g] = per
        return out


class History:
    """A memwatch history for notebooks and scripts: runs as numpy arrays, and the report tables."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = resolve_history_path(path)
        self.store = HistoryStore(self.path, readonly=True)

    def close(self) -> None:
        self.store.close()

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
        from .history import decode_floats, decode_ints

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
        for ei, ev in enumerate(evals):
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
            from .history import reveal_matches

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
        import csv
        import io

        from .report import render_csv

        table = pd.read_csv(io.StringIO(render_csv(self)), quoting=csv.QUOTE_MINIMAL)
        return table


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
                "evaluations": len(r.steps),
                "probes": len(r.ids),
            }
            for r in runs
        ],
        "evals": [],
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
        out["transitions"].extend({"run_id": r.run_id, **row} for row in r.transitions())
        out["probes"].extend({"run_id": r.run_id, **row} for row in r.timelines())
    return out
