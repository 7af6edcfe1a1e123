"""Your own sinks: every record, in order, after the history and the alerts; a failing one is contained."""

from __future__ import annotations

import os

import pytest
from _models import memorizing_panel, trained_model

from memwatch import AlertConfig, History, Monitor, MonitorConfig, Sink
from memwatch.store.history import HistoryStore

K = M = 16


def _monitor(tmp_path, sinks, **alerts):
    train, panel = memorizing_panel(K, M)
    config = MonitorConfig(
        prefix_len=K,
        suffix_len=M,
        entropy_window=8,
        console=False,
        tensorboard=False,
        every_n_steps=1,
        alerts=AlertConfig(**alerts) if alerts else AlertConfig(enabled=False),
    )
    monitor = Monitor(
        config, probes=[{"input_ids": r.tolist(), "group": "custom"} for r in panel[8:]], sinks=sinks
    )
    model = trained_model("gpt2", K, M)
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in train])
    return monitor, model


class Collector:
    """A sink object: what it saw when each record came, and how often it was closed."""

    name = "collector"

    def __init__(self, history_path: str) -> None:
        self.history_path = history_path
        self.seen: list[tuple[int, list[str], list[int]]] = []
        self.closed = 0

    def write(self, record) -> None:
        with History(self.history_path) as h:  # the history already holds this evaluation
            steps = [r.step for _e, r in h.run().records()]
        self.seen.append((record.step, [a.rule for a in record.alerts], steps))

    def close(self) -> None:
        self.closed += 1


def test_function_and_object_sinks_get_every_record_after_history_and_alerts(tmp_path):
    path = os.path.join(tmp_path, "memwatch", "history.sqlite")
    collector = Collector(path)
    steps: list[int] = []
    assert isinstance(collector, Sink) and not isinstance(steps.append, Sink)
    monitor, model = _monitor(
        tmp_path, [lambda r: steps.append(r.step), collector], thresholds={"train/extraction_rate": 0.1}
    )
    assert [s.name for s in monitor.sinks] == ["history", "alerts", "<lambda>", "collector"]
    for step in (1, 2, 3):
        assert monitor.on_step(model, step) is not None
    monitor.finish(model, 3)
    assert steps == [1, 2, 3]
    assert [s for s, _rules, _h in collector.seen] == [1, 2, 3]
    # The training group is memorized (extraction rate above 0.1): the threshold fires once, and the sink sees it.
    fired = [rules for _s, rules, _h in collector.seen]
    assert "threshold" in fired[0] and fired[1:] == [[], []]
    assert [h for _s, _r, h in collector.seen] == [[1], [1, 2], [1, 2, 3]]
    assert collector.closed == 1 and monitor.sinks == []


@pytest.mark.monitor_failures
def test_a_failing_sink_loses_only_its_own_output(tmp_path, caplog):
    later: list[int] = []

    def broken(record):
        raise ConnectionError("dashboard unreachable")

    monitor, model = _monitor(tmp_path, [broken, lambda r: later.append(r.step)], thresholds={})
    records = [monitor.evaluate(model, step) for step in (1, 2, 3)]
    assert all(r is not None for r in records) and not monitor.disabled
    assert later == [1, 2, 3]  # the next sink still gets every record
    assert monitor.losses["broken"]["count"] == 3
    summary = monitor.loss_summary()
    assert "broken: 3 of 3 evaluation(s) not written" in summary and "dashboard unreachable" in summary
    assert sum("writing the broken failed" in r.getMessage() for r in caplog.records) == 1  # logged once
    monitor.close()
    path = os.path.join(tmp_path, "memwatch", "history.sqlite")
    with History(path) as h:
        assert [r.step for _e, r in h.run().records()] == [1, 2, 3]  # nothing the history holds is lost
    with HistoryStore(path, readonly=True) as store:  # the incident, once, and the summary at the end
        messages = [a["message"] for a in store.alerts()]
    assert sum("could not write the broken" in m for m in messages) == 1
    assert any(m.startswith("memwatch lost data during this run: broken") for m in messages)


def test_a_sink_that_is_neither_a_function_nor_a_sink_is_refused_at_construction():
    with pytest.raises(
        TypeError, match=r"a function of the EvalRecord, or an object with name, write\(record\)"
    ):
        Monitor(MonitorConfig(), sinks=["wandb"])
