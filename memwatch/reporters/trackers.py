"""memwatch's numbers where the loss already is: a sink that forwards each evaluation to the run's experiment trackers."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from memwatch.record import EvalRecord

__all__ = [
    "TRACKER_MODES",
    "CallbackTarget",
    "MlflowTarget",
    "Target",
    "TrackerSink",
    "WandbTarget",
    "attach_trackers",
    "tracker_key",
    "tracker_metrics",
]

log = logging.getLogger("memwatch")

TRACKER_MODES = ("headline", "all", "off")


def tracker_key(scope: str, stat: str) -> str:
    """memwatch/<scope>/<stat>, in the characters every tracker takes (MLflow refuses "~": train~heldout becomes
    train_vs_heldout)."""
    key = f"memwatch/{scope}/{stat}".replace("~", "_vs_")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


def _tracked_stats() -> dict[str, set[str]]:
    """Per scope kind, the statistics forwarded by default: the registry's aggregates marked `tracked` and, for
    member/control pairs, every membership signal's tracked contrasts (its AUC)."""
    from memwatch.signals import REGISTRY

    out: dict[str, set[str]] = {"group": set(), "tier": set(), "pair": set()}
    for signal in REGISTRY.signals.values():
        for agg in signal.aggregates:
            if agg.tracked:
                for kind in ("group", "tier"):
                    if kind in agg.scopes:
                        out[kind].add(agg.stat)
        if signal.membership:
            for contrast in REGISTRY.contrasts.values():
                if contrast.headline and "pair" in contrast.scopes:
                    out["pair"].add(f"{signal.name}_{contrast.name}")
    return out


def tracker_metrics(record: EvalRecord, which: str = "headline") -> dict[str, float]:
    """The record's numbers for a tracker: "headline" (per group extraction rate, memorized rate and suffix NLL;
    per canary tier extraction rate and exposure; the member/control AUCs; the alerts of this evaluation) or "all"
    (every group statistic); finite values only, keys from tracker_key."""
    import math

    out: dict[str, float] = {}
    if which == "all":
        for scope in record.scopes:
            prefix = f"{scope.key}/"
            for key, value in record.scalars.items():
                if key.startswith(prefix) and math.isfinite(value):
                    out[tracker_key(scope.key, key[len(prefix) :])] = float(value)
    else:
        tracked = _tracked_stats()
        for scope in record.scopes:
            for stat in sorted(tracked.get(scope.kind, ())):
                value = record.scalars.get(f"{scope.key}/{stat}")
                if value is not None and math.isfinite(value):
                    out[tracker_key(scope.key, stat)] = float(value)
    out["memwatch/alerts"] = float(len(record.alerts))
    return out


class Target(Protocol):
    """One tracker of the run, as the training framework set it up: `log` the numbers at the training step, say an
    alert where the tracker has a notion of one, keep files where it takes artifacts (the last two may do nothing)."""

    name: str

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def alert(self, title: str, text: str) -> None: ...

    def artifacts(self, paths: Sequence[str], name: str) -> None: ...


class WandbTarget:
    """A W&B run: numbers with run.log (at `step_key` = step when the framework plots against its own step metric,
    as the Trainer does with train/global_step, else as W&B's step), alerts with run.alert (WARN), files as one
    artifact of type "memwatch"."""

    name = "wandb"

    def __init__(self, run: Any, step_key: str | None = None, log_metrics: bool = True) -> None:
        self.run = run
        self.step_key = step_key
        self.log_metrics = log_metrics

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.log_metrics:
            return
        if self.step_key is not None:
            self.run.log({**metrics, self.step_key: step})
        else:
            self.run.log(dict(metrics), step=step)

    def alert(self, title: str, text: str) -> None:
        import wandb

        self.run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)

    def artifacts(self, paths: Sequence[str], name: str) -> None:
        import wandb

        artifact = wandb.Artifact(name, type="memwatch", description="memwatch history and report")
        for path in paths:
            artifact.add_file(path)
        self.run.log_artifact(artifact)


class MlflowTarget:
    """An MLflow run, addressed by id through MlflowClient (so an evaluation after the framework ended the run still
    lands in it, never in a new run MLflow would start): metrics with their step, alerts as tags
    (memwatch.alert.<n>, memwatch.alerts), files under artifacts/memwatch."""

    name = "mlflow"

    def __init__(self, run_id: str, tracking_uri: str | None = None, log_metrics: bool = True) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)
        self.log_metrics = log_metrics
        self.alerts = 0

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.log_metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def alert(self, title: str, text: str) -> None:
        self.alerts += 1
        self.client.set_tag(self.run_id, f"memwatch.alert.{self.alerts}", f"{title}: {text}"[:5000])
        self.client.set_tag(self.run_id, "memwatch.alerts", str(self.alerts))

    def artifacts(self, paths: Sequence[str], name: str) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, path, artifact_path="memwatch")


class CallbackTarget:
    """Anything else the training framework logs to, through its own logging call (a Trainer integration's on_log,
    a Lightning logger's log_metrics, an Accelerate tracker's log): numbers only."""

    def __init__(self, name: str, log: Any) -> None:
        self.name = name
        self._log = log

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._log(dict(metrics), step)

    def alert(self, title: str, text: str) -> None:
        pass

    def artifacts(self, paths: Sequence[str], name: str) -> None:
        pass


class TrackerSink:
    """Forwards each evaluation to `targets` (rank 0): tracker_metrics(record, which) at the record's step, every
    alert, and at the end the history (a consistent copy) and its HTML report as artifacts. A target that fails is
    logged once and skipped from then on; the others, and training, go on."""

    name = "trackers"

    def __init__(self, targets: Sequence[Target], which: str = "headline", *, run: Any = None) -> None:
        if which not in TRACKER_MODES:
            raise ValueError(f"trackers must be one of {TRACKER_MODES}; got {which!r}")
        self.targets = list(targets)
        self.which = which
        self.run = (
            run  # what says, once set up, where the history is (history_path) and the run's name (run_name)
        )
        self.failed: set[str] = set()
        self.written = 0  # evaluations forwarded: a run that never evaluated sends no artifacts

    def _each(self, what: str, fn: Any) -> None:
        for target in self.targets:
            if target.name in self.failed:
                continue
            try:
                fn(target)
            except Exception as exc:
                self.failed.add(target.name)
                log.error(
                    "memwatch: forwarding %s to %s failed; it gets no more memwatch numbers in this run",
                    what,
                    target.name,
                    exc_info=exc,
                )

    def write(self, record: EvalRecord) -> None:
        self.written += 1
        metrics = tracker_metrics(record, self.which)
        self._each("numbers", lambda t: t.log(metrics, record.step))
        for alert in record.alerts:
            title = f"memwatch: {alert.rule} at step {alert.step}"
            self._each("an alert", lambda t, title=title, text=alert.message: t.alert(title, text))

    def close(self) -> None:
        path = getattr(self.run, "history_path", None)
        if not self.targets or not self.written or not path or not os.path.exists(path):
            return
        folder = tempfile.mkdtemp(prefix="memwatch-artifacts-")
        paths = _snapshot(path, folder)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", getattr(self.run, "run_name", None) or "run")
        self._each("the history and report", lambda t: t.artifacts(paths, f"memwatch-{safe}"))


def attach_trackers(monitor: Any, find: Callable[[], Sequence[Target]]) -> None:
    """Add a TrackerSink for the targets `find()` returns to `monitor` (before its setup), unless
    MonitorConfig.trackers is "off", there are none, or one is attached already (a Trainer trained again)."""
    if monitor.config.trackers == "off" or any(isinstance(s, TrackerSink) for s in monitor.user_sinks):
        return
    targets = find()
    if targets:
        monitor.add_sink(TrackerSink(targets, monitor.config.trackers, run=monitor))


def _snapshot(path: str, folder: str) -> list[str]:
    """A consistent copy of the history (SQLite's backup API: nothing half-written, the write-ahead log included)
    and its HTML report, in `folder`."""
    copy = os.path.join(folder, "history.sqlite")
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    dst = sqlite3.connect(copy)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    paths = [copy]
    try:
        from memwatch.posthoc.report import render_html
        from memwatch.store.runs import History

        with History(copy) as history:
            page = render_html(history)
        report = os.path.join(folder, "report.html")
        with open(report, "w", encoding="utf-8") as f:
            f.write(page)
        paths.append(report)
    except Exception as exc:  # the history itself still goes
        log.warning("memwatch: the HTML report for the trackers could not be made: %s", exc)
    return paths
