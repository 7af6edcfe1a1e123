"""Where an evaluation's record goes: one `Sink` protocol for the history, TensorBoard, console, alerts and yours."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memwatch.record import EvalRecord

__all__ = ["AlertsSink", "CallableSink", "HistorySink", "Sink", "as_sink", "open_alerts", "write_history"]


@runtime_checkable
class Sink(Protocol):
    """Takes each evaluation's record on rank 0, in order, after the record is complete.

    `name` identifies it in the failure bookkeeping (an error in `write` is caught, logged once, counted and
    summarized at the end of the run; it never stops the other sinks or training, unless strict=True). `write`
    may read everything in the record, and an earlier sink's additions (the alerts sink sets `record.alerts` and
    `record.actions` before the user's sinks run). `close` is called once at the end of the run.
    """

    name: str

    def write(self, record: EvalRecord) -> None: ...

    def close(self) -> None: ...


class CallableSink:
    """A plain function of the record as a sink (closing does nothing)."""

    def __init__(self, fn: Callable[[EvalRecord], Any], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    def write(self, record: EvalRecord) -> None:
        self.fn(record)

    def close(self) -> None:
        pass


def as_sink(sink: Any) -> Sink:
    """A Sink as given, or a callable wrapped as one; anything else is a TypeError naming what is allowed."""
    if isinstance(sink, Sink):
        return sink
    if callable(sink):
        return CallableSink(sink)
    raise TypeError(
        f"a memwatch sink is a function of the EvalRecord, or an object with name, write(record) and close(); "
        f"got {type(sink).__name__}"
    )


def write_history(history: Any, run_id: int, record: EvalRecord, reveal_text: bool) -> None:
    """One evaluation into the history: the typed columns, and every other stored signal through the catalog."""
    from memwatch.signals import REGISTRY
    from memwatch.store.history import RESULT_COLUMNS

    r = record.result
    assert r is not None
    columns: dict[str, Any] = {name: record.values.get(name) for name in RESULT_COLUMNS}
    columns["exposure"] = record.exposure
    columns["generated"] = None if r.generated is None else r.generated.astype(np.int32)
    columns["entropy"] = r.entropy
    signals = {
        name: (REGISTRY.signals[name], values)
        for name, values in record.values.items()
        if name not in RESULT_COLUMNS and REGISTRY.signals[name].stored and np.isfinite(values).any()
    }
    # Group statistics a replay cannot recompute are kept as numbers (a key is "<scope>/<stat>"; scope keys may
    # hold a "/" themselves: canaries/4x).
    keeping = [g for g in REGISTRY.group_stats.values() if g.kept]
    kept = {}
    if keeping:
        prefixes = [scope.key + "/" for scope in record.scopes]
        for table in (record.scalars, record.arrays):
            for key, value in table.items():
                stat = next((key[len(p) :] for p in prefixes if key.startswith(p)), None)
                if stat is not None and any(g.owns(stat) for g in keeping):
                    kept[key] = value
    history.add_evaluation(
        run_id,
        record.step,
        spec=record.spec,
        probe_ids=record.probe_ids,
        wall_time=record.wall_time,
        duration=record.duration,
        label=record.label,
        reveal_generated=reveal_text,
        columns=columns,
        signals=signals,
        kept=kept,
    )


class HistorySink:
    """The per-probe SQLite history (a HistoryStore, already holding the run and its panel)."""

    name = "history"

    def __init__(self, store: Any, run_id: int, reveal_text: bool) -> None:
        self.store, self.run_id, self.reveal_text = store, run_id, reveal_text

    def write(self, record: EvalRecord) -> None:
        write_history(self.store, self.run_id, record, self.reveal_text)

    def close(self) -> None:
        self.store.close()


class AlertsSink:
    """Evaluates the alert rules on each record and delivers what fires to the alert sinks (AlertSinks)."""

    name = "alerts"

    def __init__(self, engine: Any, delivery: Any, delivered: list[Any]) -> None:
        self.engine = engine
        self.delivery = delivery
        self.delivered = delivered  # every alert of the run, in order (the monitor's `alerts`)

    def write(self, record: EvalRecord) -> None:
        alerts = self.engine.evaluate(record)
        for alert in alerts:
            self.delivery.emit(alert)
            if alert.action:
                record.actions.update(alert.action.split(","))
        self.delivery.flush()
        record.alerts = alerts
        self.delivered.extend(alerts)

    def close(self) -> None:
        self.delivery.close()  # waits a bounded time for webhook posts in flight


def open_alerts(
    config: Any,
    *,
    run_name: str | None,
    output_dir: str | None,
    history: Any,
    run_id: int | None,
    tensorboard: Any,
    console: Any,
    describe: Callable[[int], str | None] | None,
    delivered: list[Any],
) -> AlertsSink | None:
    """The alert rules and where alerts go (rank 0): console, log, JSONL, history, TensorBoard, your function,
    webhook. None when alerts are off."""
    from memwatch.alerts import AlertEngine, AlertSinks, WebhookSink, jsonl_sink

    acfg = config.alerts
    if not acfg.enabled:
        return None
    engine = AlertEngine(acfg, describe=describe if config.reveal_text else None)
    sinks = AlertSinks()
    if console is not None:
        sinks.add("console", console.alert)
    level = logging.INFO if console is not None else logging.WARNING  # the console already shows it
    sinks.add(
        "logging",
        lambda a: logging.getLogger("memwatch.alerts").log(level, "memwatch alert: %s", a.message),
    )
    if acfg.jsonl:  # beside the history
        where = os.path.dirname(os.path.abspath(history.path)) if history is not None else output_dir
        sinks.add("jsonl", jsonl_sink(os.path.join(where or ".", "alerts.jsonl")))
    if history is not None and run_id is not None:
        sinks.add(
            "history",
            lambda a: history.add_alert(
                run_id,
                a.step,
                rule=a.rule,
                message=a.message,
                group=a.group,
                probe_ids=a.probe_ids,
                action=a.action,
                data=a.data,
                wall_time=a.wall_time,
            ),
        )
    if tensorboard is not None:
        # Buffered: TensorBoard keeps one text entry per tag and step, so all of a step's alerts go in one.
        sinks.add("tensorboard", tensorboard.add_alert, flush=tensorboard.flush_alerts)
    if acfg.on_alert is not None:
        sinks.add("on_alert", acfg.on_alert)
    if acfg.webhook_url:
        hook = WebhookSink(acfg.webhook_url, acfg.webhook_timeout, acfg.webhook_retries, run_name)
        grace = min(10.0, acfg.webhook_timeout * (acfg.webhook_retries + 1) + 1)
        sinks.add("webhook", hook, close=lambda: hook.close(grace), undelivered=hook.undelivered)
    return AlertsSink(engine, sinks, delivered)
