"""Interrupted and concurrent runs: an interrupted run says so and is marked; a second writer is told; runs differ."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from _models import tiny_model

from memwatch import Monitor, MonitorConfig
from memwatch.cli import main
from memwatch.live.monitor import SetupError
from memwatch.store.runs import History

TESTS = os.path.dirname(os.path.abspath(__file__))

_INTERRUPTED = """
import sys
sys.path.insert(0, {tests!r})
from test_trainer import K, M, make_trainer
from transformers import TrainerCallback
from memwatch import MemWatchCallback, MonitorConfig

class CtrlC(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 30:
            raise KeyboardInterrupt

cb = MemWatchCallback(MonitorConfig(every_n_steps=10, prefix_len=K, suffix_len=M, console=False))
make_trainer({out!r}, [cb, CtrlC()], steps=100).train()
"""


def test_a_training_stopped_by_ctrl_c_is_marked_interrupted_and_says_so(tmp_path):
    code = textwrap.dedent(_INTERRUPTED.format(tests=TESTS, out=str(tmp_path)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "KeyboardInterrupt" in run.stderr
    assert "ended before training finished (last step 30)" in run.stderr, run.stderr[-3000:]
    assert "4 evaluation(s) are kept in" in run.stderr and "marked interrupted" in run.stderr
    with History(tmp_path) as h:
        data = h.run()
        assert data.status == "interrupted" and data.steps.tolist() == [0, 10, 20, 30]
        assert h.store.runs()[-1]["last_step"] == 30
    assert main(["report", str(tmp_path), "--format", "json"]) == 0
    # The text report says it in its run header.
    out = tmp_path / "report.txt"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    assert "INTERRUPTED before training finished" in out.read_text()


_HOLDER = """
import sys
sys.path.insert(0, {tests!r})
from _models import tiny_model
from memwatch import Monitor, MonitorConfig

monitor = Monitor(MonitorConfig(prefix_len=8, suffix_len=8, console=False), probes=[list(range(1, 17))])
monitor.setup(tiny_model("gpt2"), output_dir={out!r}, run_name="same")
print("ready", flush=True)
if sys.stdin.readline().strip() == "close":
    monitor.close()
"""


def _holder(out: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER.format(tests=TESTS, out=out))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr.read()  # type: ignore[union-attr]
    return proc


def test_a_second_writer_is_told_and_kept_apart_and_cannot_take_over_the_same_run(tmp_path, caplog):
    out = str(tmp_path)
    proc = _holder(out)
    try:
        config = MonitorConfig(prefix_len=8, suffix_len=8, console=False)
        model = tiny_model("gpt2")
        # Continuing (resuming) the run the other process is writing is refused at setup.
        with pytest.raises(SetupError, match=f"being written right now by process {proc.pid}"):
            Monitor(config, probes=[list(range(1, 17))]).setup(
                model, output_dir=out, run_name="same", start_step=10
            )
        with caplog.at_level(logging.WARNING, logger="memwatch"):
            second = Monitor(config, probes=[list(range(1, 17))])
            second.setup(model, output_dir=out, run_name="same")
        assert f"another process (pid {proc.pid}" in caplog.text and "separate run" in caplog.text
        second.evaluate(model, 0)
        second.close()
        # Its TensorBoard events are in their own folder, not mixed into the first run's.
        assert os.path.isdir(tmp_path / "memwatch" / "tb" / "run-2") and any(
            name.startswith("events")
            for _, _, files in os.walk(tmp_path / "memwatch" / "tb" / "run-2")
            for name in files
        )
        with History(tmp_path) as h:
            states = {r["run_id"]: r["status"] for r in h.store.runs()}
        assert states == {1: "running", 2: "finished"}
    finally:
        proc.stdin.write("close\n")  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=60)
    with History(tmp_path) as h:
        assert [r["status"] for r in h.store.runs()] == ["finished", "finished"]


def test_a_killed_writer_is_seen_as_stopped_and_runs_of_one_name_are_told_apart(tmp_path, capsys):
    out = str(tmp_path)
    for _ in range(2):
        proc = _holder(out)
        proc.send_signal(signal.SIGKILL)  # no chance to say anything
        proc.wait(timeout=60)
        time.sleep(1.1)  # distinct start seconds
    with History(tmp_path) as h:
        assert [r["status"] for r in h.store.runs()] == ["stopped", "stopped"]
    history = str(tmp_path / "memwatch" / "history.sqlite")
    assert main(["compare", f"{history}::1", f"{history}::2", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["a"]["run_id"], d["b"]["run_id"]) == (1, 2) and d["a"]["started"] < d["b"]["started"]
    assert main(["compare", f"{history}::1", f"{history}::2"]) == 0
    text = capsys.readouterr().out
    a_line = next(line for line in text.splitlines() if line.startswith("A = "))
    b_line = next(line for line in text.splitlines() if line.startswith("B = "))
    assert a_line[4:] != b_line[4:] and "same #1 (live, started" in a_line and "stopped" in a_line


@pytest.mark.slow
def test_ctrl_c_in_the_demo_says_what_happened_and_a_rerun_starts_over(tmp_path, capsys):
    from memwatch.demo import DemoSettings, run_demo

    out = tmp_path / "demo"
    small = "tiers=(1, 16), exposure_references=32, train_bytes=60_000, live=False"  # the demo, shortened
    code = f"from memwatch.demo import DemoSettings, run_demo\nrun_demo(DemoSettings(steps=2000, out={str(out)!r}, {small}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # As in a terminal: a test worker (pytest-xdist) ignores SIGINT, and a child that inherits the ignore
        # never turns Ctrl-C into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    history = out / "memwatch" / "history.sqlite"
    deadline = time.time() + 240
    while time.time() < deadline:  # Ctrl-C once the run has evaluated past its baseline
        time.sleep(1)
        if history.exists():
            with History(history) as h:
                if h.store.runs() and len(h.run().steps) >= 1:
                    break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)  # a shared CI machine may be slow to unwind
    assert proc.returncode in (130, -signal.SIGINT), stderr[-3000:]
    assert "Interrupted at step" in stdout and "marked interrupted" in stdout and "starts over" in stdout
    with History(history) as h:
        assert h.run().status == "interrupted"
    first_pid = proc.pid
    # The rerun replaces the interrupted demo: one run in the history, TensorBoard events of this process only.
    settings = DemoSettings(
        steps=10,
        every=10,
        out=str(out),
        live=False,
        tiers=(1, 16),
        exposure_references=32,
        train_bytes=60_000,
    )
    run_demo(settings)
    assert "starting over" in capsys.readouterr().out
    with History(history) as h:
        assert [r["status"] for r in h.store.runs()] == ["finished"]
    writers = {
        int(name.split(".")[-2])
        for _, _, files in os.walk(out)
        for name in files
        if name.startswith("events.out.tfevents")
    }
    assert writers == {os.getpid()} and first_pid not in writers
    # A directory the demo did not write is never emptied.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["demo", "--steps", "10", "--out", str(mine)]) == 2
    assert "holds files the demo did not write" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"


def test_claiming_a_run_is_one_check_and_mark(tmp_path):
    """Two processes resuming one run at once: the check for a live writer and the "running" mark are one
    transaction, so the second claim sees the first (here: a live process on this host, our parent) and is refused;
    a writer that is gone leaves the run to be claimed."""
    from memwatch.store.history import HistoryStore

    path = str(tmp_path / "h.sqlite")
    with HistoryStore(path) as store:
        run = store.add_run("r", source="live", model="m", config={})
        assert store.claim_run(run) is None  # ours now
        assert store.runs()[0]["status"] == "running" and store.runs()[0]["pid"] == os.getpid()
        store.conn.execute("UPDATE run_state SET pid = ? WHERE run_id = ?", (os.getppid(), run))
        store.conn.commit()
        assert store.claim_run(run) == {"run_id": run, "pid": os.getppid(), "host": socket.gethostname()}
        assert store.runs()[0]["pid"] == os.getppid()  # refused: nothing written
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        store.conn.execute("UPDATE run_state SET pid = ? WHERE run_id = ?", (gone.pid, run))
        store.conn.commit()
        assert store.claim_run(run) is None and store.runs()[0]["pid"] == os.getpid()
