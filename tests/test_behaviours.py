"""Documented behaviours in a real Trainer: the defaults, the switches, exact mode end to end, the Trainer's own
TensorBoard, a twin found in the data, Lightning's checkpoint action and restore, a read-only output directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _models import VOCAB
from test_trainer import K, M, make_trainer, read_events

from memwatch import MemWatchCallback, MonitorConfig
from memwatch.cli import main
from memwatch.store.runs import History


def _rows(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": r.tolist(), "labels": r.tolist()}
        for r in torch.randint(0, VOCAB, (n, length), generator=g)
    ]


def test_monitor_config_at_its_defaults_in_a_real_trainer(tmp_path):
    """MonitorConfig() as it comes: k = m = 32, the adaptive cadence, the automatic batch size, amp_dtype 'auto'
    following the Trainer's bf16."""
    cb = MemWatchCallback(MonitorConfig(console=False))
    trainer = make_trainer(
        tmp_path, [cb], steps=60, train=_rows(16, 80), held=_rows(8, 80, seed=1), bf16=True
    )
    trainer.train()
    monitor = cb.monitor
    assert (
        monitor.amp_dtype == "bf16" and monitor.batch_size is None
    )  # never lowered: the automatic size held
    interval = monitor.cadence.interval
    assert interval is not None and interval >= 1  # chosen from measured costs after the warm-up steps
    steps = monitor.evaluated_steps
    assert steps[0] == 0 and steps[-1] == 60  # the baseline and the final model
    assert all(s % interval == 0 for s in steps[1:-1])
    with History(tmp_path) as h:
        run = h.run()
    assert run.specs[-1] == {"prefix_len": 32, "suffix_len": 32, "entropy_window": 16, "mode": "full"}
    assert run.group_names() == ["train", "heldout"]


def test_no_baseline_and_no_final_evaluation_when_switched_off(tmp_path):
    cb = MemWatchCallback(
        MonitorConfig(
            every_n_steps=5, prefix_len=K, suffix_len=M, console=False, eval_on_start=False, eval_on_end=False
        )
    )
    make_trainer(tmp_path, [cb], steps=12).train()
    assert cb.monitor.evaluated_steps == [5, 10]


def test_exposure_every_second_evaluation(tmp_path):
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries

    rows = [{"input_ids": list(range(i, i + 48)), "labels": list(range(i, i + 48))} for i in range(40)]
    man = make_canaries(ByteTokenizer(), tiers=(4,), per_tier=1, prefix_len=K, secret_len=M, references=8)
    data, man = inject(rows, man)
    cfg = MonitorConfig(
        every_n_steps=2, prefix_len=K, suffix_len=M, console=False, exposure_references=8, exposure_every=2
    )
    cb = MemWatchCallback(cfg, canaries=man)
    make_trainer(tmp_path, [cb], steps=8, train=data).train()
    with History(tmp_path) as h:
        run = h.run()
    assert run.steps.tolist() == [0, 2, 4, 6, 8]
    canaries = np.isin(run.groups, ["canary", "canary_heldout"])
    scored = [bool(np.isfinite(run.exposure[e, canaries]).all()) for e in range(5)]
    assert scored == [True, False, True, False, True]
    assert not np.isfinite(run.exposure[1:4:2]).any()


def test_exact_mode_through_monitor_history_tensorboard_and_report(tmp_path, capsys):
    cb = MemWatchCallback(
        MonitorConfig(every_n_steps=50, prefix_len=K, suffix_len=M, console=False, mode="exact")
    )
    make_trainer(tmp_path, [cb], steps=150).train()
    assert cb.monitor.evaluated_steps == [0, 50, 100, 150]
    record = cb.monitor.last_record
    assert (
        record.result.mode == "exact"
        and record.result.generated is None
        and record.result.match_ratio is None
    )
    with History(tmp_path) as h:
        run = h.run()
    assert {s["mode"] for s in run.specs} == {"exact"} and run.generated is None
    assert np.isnan(run.match_ratio).all() and np.isnan(run.edit_similarity).all()
    assert run.exact[-1].sum() > 0  # memorization is measured in exact mode too
    tags = read_events(str(tmp_path / "memwatch" / "tb" / "train")).Tags()
    assert "memwatch/extraction_rate" in tags["scalars"]
    assert (
        "memwatch/tf_boundary_jump/exact" in tags["scalars"]
        or "memwatch/prefix_bucket/exact" in tags["scalars"]
    )
    assert "memwatch/mean_match_ratio" not in tags["scalars"]  # not measured, so not written as 0 or NaN
    capsys.readouterr()  # the Trainer's own log lines
    assert main(["report", str(tmp_path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    last = next(r for r in report["evals"] if r["step"] == 150 and r["group"] == "train")
    assert last["mean_match_ratio"] is None and last["extracted"] == int(
        run.exact[-1][run.groups == "train"].sum()
    )


def test_the_trainers_own_tensorboard_is_unchanged_by_memwatch(tmp_path):
    def scalars(out):
        runs = os.path.join(out, "runs")
        acc = read_events(os.path.join(runs, os.listdir(runs)[0]))
        clock = ("train/train_runtime", "train/train_samples_per_second", "train/train_steps_per_second")
        return {
            t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t not in clock
        }

    cb = MemWatchCallback(MonitorConfig(every_n_steps=5, prefix_len=K, suffix_len=M, console=False))
    make_trainer(tmp_path / "a", [cb], steps=20, logging_steps=5, report_to=["tensorboard"]).train()
    make_trainer(tmp_path / "b", [], steps=20, logging_steps=5, report_to=["tensorboard"]).train()
    with_memwatch, without = scalars(tmp_path / "a"), scalars(tmp_path / "b")
    assert "train/loss" in without and with_memwatch == without
    assert cb.monitor.evaluated_steps == [0, 5, 10, 15, 20]
    assert not any(t.startswith("memwatch") for t in with_memwatch)


def test_a_twin_found_in_the_training_data_is_reported(tmp_path, caplog):
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries

    rows = [{"input_ids": list(range(i, i + 48)), "labels": list(range(i, i + 48))} for i in range(40)]
    man = make_canaries(ByteTokenizer(), tiers=(2,), per_tier=1, prefix_len=K, secret_len=M, references=8)
    data, man = inject(rows, man)
    twin = man.twins[0]
    leaked = list(twin.tokens[twin.secret_start - K :]) + list(range(48))
    data.append({"input_ids": leaked[:48], "labels": leaked[:48]})  # a twin leaked into the data
    cb = MemWatchCallback(
        MonitorConfig(every_n_steps=5, prefix_len=K, suffix_len=M, console=False), canaries=man
    )
    with caplog.at_level("WARNING", logger="memwatch"):
        make_trainer(tmp_path, [cb], steps=5, train=data).train()
    assert f"the never-inserted twin {twin.id} occurs in the training data" in caplog.text
    assert cb.monitor.preflight_report.twins_found == [twin.id]


def test_lightning_save_checkpoint_action_and_restore_from_its_checkpoint(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from memwatch.integrations.lightning import MemWatchLightningCallback
    from test_integrations import lightning_fit

    from memwatch import AlertConfig

    alerts = AlertConfig(extraction_rate={"train": 0.25}, actions={"extraction_rate": ("save_checkpoint",)})
    cfg = MonitorConfig(every_n_steps=5, prefix_len=K, suffix_len=M, console=False, alerts=alerts)
    cb = MemWatchLightningCallback(cfg)
    lightning_fit(pl, tmp_path, cb, max_steps=60)
    fired = [a for a in cb.monitor.alerts if a.rule == "extraction_rate"]
    assert fired
    ckpt = tmp_path / "memwatch" / f"checkpoint-step{fired[0].step}.ckpt"
    assert ckpt.exists()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "MemWatchLightningCallback" in k)
    assert state["evaluated_steps"][-1] == fired[0].step
    # Restored into a fresh callback, the monitor carries on from that state.
    fresh = MemWatchLightningCallback(cfg)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["evaluated_steps"] == state["evaluated_steps"]
    assert fresh.state_dict()["tracker"] == state["tracker"]


_READ_ONLY = """
import sys
sys.path.insert(0, {tests!r})
from _models import tiny_model
from memwatch import Monitor, MonitorConfig
from memwatch.live.monitor import SetupError
monitor = Monitor(MonitorConfig(prefix_len=16, suffix_len=16, console=False), probes=[list(range(40))])
try:
    monitor.setup(tiny_model("gpt2"), output_dir={out!r})
    print("set up")
except SetupError as exc:
    print("SetupError:", exc)
"""


def test_a_read_only_output_directory_as_an_ordinary_user(tmp_path):
    """Permissions as an ordinary user sees them: root ignores them (CAP_DAC_OVERRIDE), so when the suite runs as
    root the child process runs without that capability (setpriv), and the directory's mode applies."""
    import shutil

    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    command = [
        sys.executable,
        "-c",
        textwrap.dedent(_READ_ONLY.format(tests=os.path.dirname(__file__), out=str(out))),
    ]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        run = subprocess.run(command, capture_output=True, text=True)
    finally:
        out.chmod(0o755)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "SetupError: cannot create the history" in run.stdout and "Permission denied" in run.stdout
