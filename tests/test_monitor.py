"""The framework-agnostic Monitor, its cadence and its configuration."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from _models import VOCAB, memorizing_panel, tiny_model, trained_model

from memwatch import Monitor, MonitorConfig
from memwatch.config import ConfigError
from memwatch.live.cadence import Cadence, nice_ceil
from memwatch.live.monitor import SetupError
from memwatch.store.history import HistoryStore


def test_config_defaults_and_validation():
    cfg = MonitorConfig()
    assert cfg.every_n_steps is None and cfg.prefix_len == cfg.suffix_len == 32 and cfg.entropy_window == 16
    assert cfg.train_probes == 512 and cfg.heldout_probes == 256 and not cfg.reveal_text
    assert MonitorConfig(every_n_steps=50).every_n_steps == 50
    assert MonitorConfig(prefix_len=8).entropy_window == 7  # the default window fits a short prefix
    with pytest.raises(AttributeError, match=r"frozen|cannot assign"):
        cfg.every_n_steps = 3
    for kwargs, message in [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1 or None"),
        ({"max_overhead": 0}, r"max_overhead must be a number in \(0, 1\]"),
        ({"prefix_len": 16, "entropy_window": 16}, "entropy_window must be at most prefix_len - 1 = 15"),
        ({"mode": "fast"}, "mode must be 'full' or 'exact'"),
        ({"amp_dtype": "int8"}, "amp_dtype must be"),
        ({"memorized_threshold": 1.5}, "memorized_threshold must be a number in"),
        ({"console": "yes"}, "console must be True or False"),
        ({"window": "middle"}, "window must be 'first' or 'random'"),
        ({"mode": "exact", "memorized_threshold": 0.9}, "needs the match ratio, which mode='exact' does not"),
        ({"history_path": ""}, "history_path must be a non-empty string or None"),
        (
            {"boundary_width": 100},
            r"boundary_width .* must be at most max\(entropy_window, suffix_len\) = 32",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            MonitorConfig(**kwargs)


def test_nice_ceil():
    assert [nice_ceil(x) for x in (0.3, 1, 1.5, 3, 7, 11, 49, 51, 101, 999, 1001)] == [
        1,
        1,
        2,
        5,
        10,
        20,
        50,
        100,
        200,
        1000,
        2000,
    ]


def test_fixed_cadence():
    c = Cadence(every_n_steps=10, max_overhead=0.02)
    assert [s for s in range(1, 41) if c.due(s)] == [10, 20, 30, 40]
    c.evaluated(20, 1.0)
    assert not c.due(20)


def test_adaptive_cadence_keeps_evaluation_time_under_the_budget():
    c = Cadence(every_n_steps=None, max_overhead=0.02, warmup_steps=5)
    c.evaluated(0, 2.0)  # an evaluation costs 2 s
    assert c.interval is None  # no step time yet
    for _ in range(5):
        c.add_step_time(0.1)  # a step costs 0.1 s
    # 2 s per evaluation at <= 2% overhead needs >= 1000 steps of 0.1 s between evaluations.
    assert c.interval == 1000
    assert c.due(1000) and not c.due(500)
    c.evaluated(1000, 0.2)  # cheaper evaluations shorten the interval (smoothed cost 1.1 s)
    assert c.interval == 1000 and c.eval_cost == pytest.approx(1.1)
    c.evaluated(2000, 0.2)
    assert c.interval == 500


def _loop_monitor(tmp_path, **cfg):
    k, m = 16, 16
    train, panel = memorizing_panel(k, m)
    config = MonitorConfig(prefix_len=k, suffix_len=m, entropy_window=8, console=False, **cfg)
    monitor = Monitor(config, probes=[{"input_ids": r.tolist(), "group": "custom"} for r in panel[8:]])
    return monitor, train, panel


def test_monitor_in_a_plain_loop(tmp_path):
    monitor, train, _ = _loop_monitor(tmp_path, every_n_steps=2)
    model = trained_model("gpt2", 16, 16)
    data = [{"input_ids": r.tolist()} for r in train]
    monitor.setup(
        model, output_dir=tmp_path, train_data=data, eval_data=[{"input_ids": r.tolist()} for r in train[:0]]
    )
    assert monitor.panel.group_names() == ["train", "custom"]
    records = [monitor.on_step(model, step) for step in range(1, 6)]
    assert [r is not None for r in records] == [False, True, False, True, False]
    assert records[1].stats["train"].extracted == 4 and records[1].stats["custom"].extracted == 0
    monitor.finish(model, 5)
    assert monitor.evaluated_steps == [2, 4, 5]
    with HistoryStore(os.path.join(tmp_path, "memwatch", "history.sqlite"), readonly=True) as h:
        assert [e["step"] for e in h.evals(h.runs()[0]["run_id"])] == [2, 4, 5]
    assert os.path.isdir(os.path.join(tmp_path, "memwatch", "tb"))


def test_outputs_can_be_switched_off_and_relocated(tmp_path):
    monitor, train, _ = _loop_monitor(
        tmp_path, history=False, tensorboard=False, output_dir=str(tmp_path / "elsewhere"), heldout_probes=0
    )
    model = trained_model("gpt2", 16, 16)
    monitor.setup(
        model, output_dir=tmp_path / "ignored", train_data=[{"input_ids": r.tolist()} for r in train]
    )
    rec = monitor.evaluate(model, 0)
    assert rec.stats["train"].extracted == 4
    monitor.close()
    # Only the alert log remains (an alert fired: every train probe is extracted), in the relocated directory.
    assert not os.path.exists(tmp_path / "ignored")
    assert os.listdir(tmp_path / "elsewhere") == ["alerts.jsonl"]


def test_setup_errors_are_clear(tmp_path):
    model = trained_model("gpt2", 16, 16)
    with pytest.raises(SetupError, match="no probes to evaluate: training data given") as exc:
        Monitor(MonitorConfig(prefix_len=16, suffix_len=16, console=False)).setup(
            model, output_dir=tmp_path, train_data=[{"input_ids": [1] * 10}]
        )
    assert "rows of at least 32 tokens (the model takes up to 128)" in str(exc.value)
    # Short rows for a model that cannot take the window at all: the position limit is the problem, and longer
    # rows (which it could not take either) are not advised.
    short_model = tiny_model("gpt2", positions=24)
    with pytest.raises(SetupError, match="exceeds the model's position limit of 24") as exc:
        Monitor(MonitorConfig(prefix_len=16, suffix_len=16, console=False)).setup(
            short_model, output_dir=tmp_path, train_data=[{"input_ids": [1] * 10}]
        )
    assert "longer" not in str(exc.value) and "rows of at least" not in str(exc.value)
    with pytest.raises(SetupError, match=r"probes given, .* 2 probe.s. were too short"):
        Monitor(
            MonitorConfig(prefix_len=16, suffix_len=16, console=False), probes=[[1] * 10, [2] * 20]
        ).setup(model, output_dir=tmp_path)
    with pytest.raises(SetupError, match="no tokenizer"):
        Monitor(MonitorConfig(console=False), probes=["some text"]).setup(model, output_dir=tmp_path)
    with pytest.raises(SetupError, match="another tokenizer"):
        Monitor(MonitorConfig(prefix_len=16, suffix_len=16, console=False), probes=[[VOCAB + 5] * 40]).setup(
            model, output_dir=tmp_path
        )
    with pytest.raises(SetupError, match="position limit of 128"):
        Monitor(MonitorConfig(prefix_len=100, suffix_len=100, console=False), probes=[[1] * 200]).setup(
            model, output_dir=tmp_path
        )
    with pytest.raises(TypeError, match="MonitorConfig"):
        Monitor({"every_n_steps": 5})
    from memwatch import AlertConfig

    for alerts in (AlertConfig(extraction_rate={"trian": 0.1}), AlertConfig(leak_groups=("held_out",))):
        with pytest.raises(
            SetupError, match=r"names group\(s\) \['(trian|held_out)'\] that the panel does not"
        ):
            Monitor(
                MonitorConfig(prefix_len=16, suffix_len=16, console=False, alerts=alerts),
                probes=[{"input_ids": [1] * 40, "group": "train"}],
            ).setup(model, output_dir=tmp_path)
    # The defaults name groups a panel may lack (no canaries here): not an error.
    Monitor(
        MonitorConfig(prefix_len=16, suffix_len=16, console=False, history=False, tensorboard=False),
        probes=[[1] * 40],
    ).setup(model, output_dir=tmp_path)


def test_user_text_probes_with_a_tokenizer_and_short_ones_filtered(tmp_path, caplog):
    class ByteTok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    monitor = Monitor(
        MonitorConfig(prefix_len=8, suffix_len=8, console=False, history=False, tensorboard=False),
        probes=["a" * 20, "too short"],
        tokenizer=ByteTok(),
    )
    with caplog.at_level("WARNING", logger="memwatch"):
        monitor.setup(trained_model("gpt2", 16, 16), output_dir=tmp_path)
    assert len(monitor.panel) == 1 and monitor.panel.group_names() == ["user"]
    assert "1 probe(s) shorter" in caplog.text
    rec = monitor.evaluate(trained_model("gpt2", 16, 16), 0)
    assert rec.result.entropy.shape == (1, 7 + 8)
    assert np.isfinite(rec.result.suffix_nll).all()


def test_adaptive_cadence_measures_when_it_has_no_cost_yet():
    c = Cadence(every_n_steps=None, max_overhead=0.02, warmup_steps=3)
    assert not c.due(1)
    for _ in range(3):
        c.add_step_time(0.1)
    assert c.due(4)  # no evaluation cost known (no baseline): evaluate once to measure it
    c.evaluated(4, 0.5)
    assert c.interval == 500 and not c.due(5) and c.due(500)


def test_resumed_monitor_keeps_its_adaptive_cadence(tmp_path):
    model = trained_model("gpt2", 16, 16)
    train, _ = memorizing_panel(16, 16)
    data = [{"input_ids": r.tolist()} for r in train]
    cfg = MonitorConfig(prefix_len=16, suffix_len=16, console=False, max_overhead=0.5, run_name="adaptive")
    first = Monitor(cfg)
    first.setup(model, output_dir=tmp_path, train_data=data)
    first.evaluate(model, 0)
    first.evaluate(model, 10)
    first.close()
    resumed = Monitor(cfg)
    resumed.setup(model, output_dir=tmp_path, train_data=data, start_step=10)
    assert resumed.evaluated_steps == [0, 10]
    assert resumed.cadence.eval_cost is not None  # seeded from the recorded durations
    for step in range(11, 12 + resumed.cadence.warmup_steps):  # the first call only starts the clock
        resumed.on_step(model, step)
    assert resumed.cadence.interval is not None  # so evaluations go on after a resume
    resumed.close()


def test_held_out_data_that_overlaps_training_is_reported(tmp_path, caplog):
    model = trained_model("gpt2", 16, 16)
    rows = [{"input_ids": list(range(i, i + 40))} for i in range(12)]
    cfg = MonitorConfig(prefix_len=16, suffix_len=16, console=False, tensorboard=False, heldout_probes=8)
    monitor = Monitor(cfg)
    with caplog.at_level("WARNING", logger="memwatch"):
        monitor.setup(
            model, output_dir=tmp_path, train_data=rows, eval_data=[*rows[:6], {"input_ids": [3] * 40}]
        )
    monitor.close()
    assert "6 held-out window(s) have the same tokens as a training window" in caplog.text
    assert monitor.panel.groups.tolist().count("heldout") == 1


def test_a_resume_that_changes_a_definition_is_refused(tmp_path):
    model = trained_model("gpt2", 16, 16)
    train, _ = memorizing_panel(16, 16)
    data = [{"input_ids": r.tolist()} for r in train]
    base = {"prefix_len": 16, "suffix_len": 16, "console": False, "tensorboard": False, "run_name": "r"}
    first = Monitor(MonitorConfig(**base))
    first.setup(model, output_dir=tmp_path, train_data=data)
    first.evaluate(model, 0)
    first.close()
    for change, shown in (
        ({"memorized_threshold": 0.5}, "memorized_threshold=0.5 (recorded with 1.0)"),
        ({"boundary_width": 2}, "boundary_width=2 (recorded with 4)"),
        ({"entropy_window": 4}, "entropy_window=4 (recorded with 15)"),
    ):
        resumed = Monitor(MonitorConfig(**base, **change))
        with pytest.raises(SetupError, match=re.escape(shown)):
            resumed.setup(model, output_dir=tmp_path, train_data=data, start_step=5)
    same = Monitor(MonitorConfig(**base))
    same.setup(model, output_dir=tmp_path, train_data=data, start_step=5)  # the same settings resume fine
    same.close()


@pytest.mark.monitor_failures
def test_an_evaluation_the_history_lost_does_not_advance_the_probes_state(tmp_path, monkeypatch):
    """Live transitions equal the ones a replay of the history gives, even when one evaluation was not recorded."""
    from memwatch import History

    model = trained_model("gpt2", 16, 16)
    monitor, train, _ = _loop_monitor(tmp_path, every_n_steps=1, tensorboard=False)
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in train])
    live = [monitor.evaluate(model, 0)]
    real = monitor.history.add_evaluation

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(monitor.history, "add_evaluation", disk_full)
    assert monitor.evaluate(model, 1) is not None  # measured and reported, not recorded
    monkeypatch.setattr(monitor.history, "add_evaluation", real)
    live.append(monitor.evaluate(model, 2))
    monitor.close()
    assert live[1].prev_step == 0  # step 1 is not in the history, so it is not the previous evaluation either
    with History(os.path.join(tmp_path, "memwatch", "history.sqlite")) as h:
        replayed = [r for _e, r in h.run().records()]
    assert [r.step for r in replayed] == [0, 2]
    for a, b in zip(live, replayed, strict=True):
        assert a.prev_step == b.prev_step
        for g in a.stats:
            assert a.stats[g].newly_memorized == b.stats[g].newly_memorized
            np.testing.assert_array_equal(
                a.stats[g].transitions if a.stats[g].transitions is not None else -1,
                b.stats[g].transitions if b.stats[g].transitions is not None else -1,
            )
