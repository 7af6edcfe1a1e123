"""memwatch never hurts the run: injected faults leave training intact and visible; bad input fails at setup."""

from __future__ import annotations

import os
import socket
import sqlite3

import numpy as np
import pytest
import torch
from test_trainer import K, M, make_trainer

import memwatch.engine.extraction
from memwatch import MemWatchCallback, MonitorConfig
from memwatch.live.monitor import SetupError
from memwatch.store.history import HistoryError, HistoryStore


def cfg(**kw):
    return MonitorConfig(every_n_steps=5, prefix_len=K, suffix_len=M, console=False, **kw)


def alerts_of(out):
    with HistoryStore(os.path.join(out, "memwatch", "history.sqlite"), readonly=True) as h:
        return h.alerts()


@pytest.mark.monitor_failures
def test_an_exception_in_extraction_is_logged_recorded_and_training_goes_on(tmp_path, monkeypatch, caplog):
    real = memwatch.engine.extraction.extract
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (2, 3):  # the evaluations at steps 5 and 10 fail, then it recovers
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(memwatch.engine.extraction, "extract", flaky)
    cb = MemWatchCallback(cfg())
    trainer = make_trainer(tmp_path, [cb], steps=20)
    with caplog.at_level("WARNING", logger="memwatch"):
        trainer.train()
    assert trainer.state.global_step == 20
    assert cb.monitor.evaluated_steps == [0, 15, 20] and not cb.monitor.disabled
    assert len(cb.monitor.failures) == 2 and "injected failure" in cb.monitor.failures[0]
    assert caplog.text.count("Traceback") == 1  # logged once with its traceback
    incidents = [a for a in alerts_of(tmp_path) if a["rule"] == "monitor_error"]
    assert [a["step"] for a in incidents] == [5, 10] and "injected failure" in incidents[0]["message"]


@pytest.mark.monitor_failures
def test_repeated_failures_switch_the_monitor_off_and_strict_raises(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ValueError("always broken")

    monkeypatch.setattr(memwatch.engine.extraction, "extract", broken)
    cb = MemWatchCallback(cfg(max_failures=3))
    trainer = make_trainer(tmp_path / "a", [cb], steps=30)
    with caplog.at_level("WARNING", logger="memwatch"):
        trainer.train()
    assert trainer.state.global_step == 30 and cb.monitor.disabled
    assert len(cb.monitor.failures) == 3  # then it stopped trying
    assert "switched itself off after 3 failed evaluations" in caplog.text
    assert [a["rule"] for a in alerts_of(tmp_path / "a")][-1] == "monitor_disabled"

    strict = MemWatchCallback(cfg(strict=True))
    with pytest.raises(ValueError, match="always broken"):
        make_trainer(tmp_path / "b", [strict], steps=10).train()


def test_out_of_memory_halves_the_batch_and_remembers(tmp_path, monkeypatch):
    real = memwatch.engine.extraction.extract
    seen = []

    def small_memory(model, seqs, **kwargs):
        seen.append(kwargs.get("batch_size"))
        if kwargs.get("batch_size") is None or kwargs["batch_size"] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, seqs, **kwargs)

    monkeypatch.setattr(memwatch.engine.extraction, "extract", small_memory)
    cb = MemWatchCallback(cfg(batch_size=16))
    trainer = make_trainer(tmp_path, [cb], steps=10)
    trainer.train()
    assert cb.monitor.failures == [] and cb.monitor.evaluated_steps == [0, 5, 10]
    assert cb.monitor.batch_size == 2
    assert seen[:4] == [16, 8, 4, 2] and seen[4:] == [2, 2]  # remembered for the next evaluations


@pytest.mark.monitor_failures
def test_a_full_disk_for_the_history_and_a_broken_tensorboard_do_not_stop_training(
    tmp_path, monkeypatch, caplog
):
    from memwatch.reporters.tensorboard import TensorBoardReporter

    def disk_full(self, *a, **k):
        raise HistoryError(f"the disk holding {self.path} is full (database or disk is full); free space")

    monkeypatch.setattr(HistoryStore, "add_evaluation", disk_full)
    cb = MemWatchCallback(cfg())
    with caplog.at_level("ERROR", logger="memwatch"):
        make_trainer(tmp_path / "full", [cb], steps=10).train()
    assert cb.monitor.evaluated_steps == [0, 5, 10]  # measurements went on, TensorBoard still written
    assert "writing the history failed" in caplog.text and caplog.text.count("Traceback") == 1
    assert os.listdir(tmp_path / "full" / "memwatch" / "tb")
    monkeypatch.undo()

    def tb_broken(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardReporter, "write", tb_broken)
    cb = MemWatchCallback(cfg())
    trainer = make_trainer(tmp_path / "tb", [cb], steps=10)
    trainer.train()
    assert trainer.state.global_step == 10
    with HistoryStore(tmp_path / "tb" / "memwatch" / "history.sqlite", readonly=True) as h:
        assert [e["step"] for e in h.evals(1)] == [0, 5, 10]  # the history has everything
    assert any("could not write the tensorboard" in a["message"] for a in alerts_of(tmp_path / "tb"))


def test_no_network_connection_without_a_webhook(tmp_path, monkeypatch):
    """Every way out is watched (TCP connect and connect_ex, UDP sendto, DNS lookups), from any thread, through a
    full run with canaries, exposure, alerts that fire and the console: memwatch's own code opens nothing."""
    import threading
    import traceback

    import memwatch
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries

    package = os.path.dirname(memwatch.__file__)
    attempts = []

    def watch(name, real):
        def wrapper(*args, **kwargs):
            stack = traceback.extract_stack()
            if any(f.filename.startswith(package) for f in stack):  # memwatch (and its integrations) only
                attempts.append((name, threading.current_thread().name, args[1:2]))
                raise OSError(f"network refused by the test: {name}")
            return real(*args, **kwargs)

        return wrapper

    for name in ("connect", "connect_ex", "sendto", "sendmsg"):
        monkeypatch.setattr(socket.socket, name, watch(name, getattr(socket.socket, name)))
    for name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        monkeypatch.setattr(socket, name, watch(name, getattr(socket, name)))
    rows = [{"input_ids": list(range(i, i + 48)), "labels": list(range(i, i + 48))} for i in range(40)]
    man = make_canaries(ByteTokenizer(), tiers=(4,), per_tier=1, prefix_len=K, secret_len=M, references=8)
    data, man = inject(rows, man)
    config = MonitorConfig(
        every_n_steps=5,
        prefix_len=K,
        suffix_len=M,
        console=True,
        exposure_references=8,
        alerts=memwatch.AlertConfig(extraction_rate={"train": 0.01}, exposure_bits=0.5),
    )
    cb = MemWatchCallback(config, canaries=man)
    make_trainer(tmp_path, [cb], steps=10, train=data).train()
    assert cb.monitor.evaluated_steps == [0, 5, 10] and not cb.monitor.failures
    assert not attempts, attempts
    # The watch itself works: memwatch's webhook does reach for the network, from its own thread.
    from memwatch.alerts import Alert, WebhookSink

    hook = WebhookSink("http://hooks.invalid/T/SECRET", timeout=1, retries=0)
    hook(Alert(0, "spike", None, [], "m"))
    hook.close(grace=5)
    assert attempts and attempts[0][1] == "memwatch-webhook"


# --- bad input at train begin ----------------------------------------------------------------------------------


def test_bad_history_files_stop_training_before_the_first_step_and_are_left_untouched(tmp_path):
    out = tmp_path / "run"
    (out / "memwatch").mkdir(parents=True)
    history = out / "memwatch" / "history.sqlite"
    history.write_bytes(b"not sqlite at all" * 64)
    before = history.read_bytes()
    trainer = make_trainer(out, [MemWatchCallback(cfg())], steps=5)
    with pytest.raises(SetupError, match="not a readable memwatch history"):
        trainer.train()
    assert trainer.state.global_step == 0 and history.read_bytes() == before

    history.unlink()
    HistoryStore(history).close()
    con = sqlite3.connect(history)
    con.execute("PRAGMA user_version=99")
    con.commit()
    con.close()
    with pytest.raises(SetupError, match="newer memwatch"):
        make_trainer(out, [MemWatchCallback(cfg())], steps=5).train()

    # A history with a damaged page in the middle: refused before the first step, not appended to.
    history.unlink()
    from test_history import _damaged_history

    _damaged_history(history)
    before = history.read_bytes()
    trainer = make_trainer(out, [MemWatchCallback(cfg())], steps=5)
    with pytest.raises(SetupError, match="is damaged"):
        trainer.train()
    assert trainer.state.global_step == 0 and history.read_bytes() == before

    history.unlink()
    HistoryStore(history).close()
    locker = sqlite3.connect(history, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        slow = MonitorConfig(every_n_steps=5, prefix_len=K, suffix_len=M, console=False)
        cb = MemWatchCallback(slow)
        cb.monitor.history_timeout = 0.2
        with pytest.raises(SetupError, match="locked by another process"):
            make_trainer(out, [cb], steps=5).train()
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cb = MemWatchCallback(cfg(output_dir=str(blocker / "memwatch")))
    with pytest.raises(SetupError, match=r"cannot create the history .* is a file, not a directory"):
        make_trainer(tmp_path / "run", [cb], steps=5).train()


def test_a_setup_that_fails_partway_leaves_no_empty_run(tmp_path):
    """The history opens, the run is created, then TensorBoard cannot start: no run stays behind for reports."""
    blocker = tmp_path / "tb_is_a_file"
    blocker.write_text("x")
    out = tmp_path / "run"
    cb = MemWatchCallback(cfg(tensorboard_dir=str(blocker / "tb")))
    with pytest.raises(SetupError, match="cannot write TensorBoard logs"):
        make_trainer(out, [cb], steps=5).train()
    with HistoryStore(out / "memwatch" / "history.sqlite", readonly=True) as h:
        assert h.runs() == []


def test_a_model_that_cannot_be_decoded(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments

    model = BertForMaskedLM(
        BertConfig(
            vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    rows = [{"input_ids": list(range(i, i + 40)), "labels": list(range(i, i + 40))} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, save_strategy="no"
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[MemWatchCallback(cfg())])
    with pytest.raises(SetupError, match="encoder-only, masked or headless"):
        trainer.train()


def test_a_tokenizer_without_a_pad_token_is_fine(tmp_path):
    from memwatch.bytetok import ByteTokenizer

    tok = ByteTokenizer()
    tok.pad_token_id = None
    cb = MemWatchCallback(
        cfg(heldout_probes=0), probes=["a text probe that is long enough to be a window " * 2], tokenizer=tok
    )
    make_trainer(tmp_path, [cb], steps=5).train()
    assert "user" in cb.monitor.panel.group_names() and cb.monitor.evaluated_steps == [0, 5]


@pytest.mark.monitor_failures
def test_model_is_unaffected_by_failures(tmp_path, monkeypatch):
    """A failing monitor leaves training bitwise identical to a run without it."""

    def broken(*args, **kwargs):
        raise RuntimeError("x")

    monkeypatch.setattr(memwatch.engine.extraction, "extract", broken)
    a = make_trainer(tmp_path / "a", [MemWatchCallback(cfg())], steps=12)
    a.train()
    b = make_trainer(tmp_path / "b", [], steps=12)
    b.train()
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


_DISK_FILLS_UP = """
import os, resource, signal, sys
sys.path.insert(0, {tests!r})
from test_trainer import K, M, make_trainer
from transformers import TrainerCallback
from memwatch import MemWatchCallback, MonitorConfig

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us


class DiskFillsUp(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:  # no file may grow any more: the disk is full from here on
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


cfg = MonitorConfig(every_n_steps=2, prefix_len=K, suffix_len=M, console=True)
cb = MemWatchCallback(cfg)
trainer = make_trainer(sys.argv[1], [DiskFillsUp(), cb], steps=20)
trainer.train()
print("trained", trainer.state.global_step, "evaluated", len(cb.monitor.evaluated_steps))
print("losses", {{k: v["count"] for k, v in cb.monitor.losses.items()}})
"""


def test_a_disk_that_fills_up_mid_run_is_told_once_and_summarized_at_the_end(tmp_path):
    import subprocess
    import sys

    script = _DISK_FILLS_UP.format(tests=os.path.dirname(__file__))
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "trained 20 evaluated 11" in out  # training finished and every evaluation was measured
    # Steps 0 and 2 were recorded; 4..20 (9 evaluations) were lost by the history and by TensorBoard.
    assert "losses {'history': 9, 'tensorboard': 9}" in out
    assert "memwatch lost data during this run: history: 9 of 11 evaluation(s) not written (steps 4-20" in out
    assert "tensorboard: 9 of 11 evaluation(s) not written" in out
    # One red panel for the broken TensorBoard writer, not one per evaluation.
    assert out.count("memwatch could not write the tensorboard") == 1, out[-4000:]


# --- out of memory, raised from inside the model's forward ---------------------------------------------------


def _oom_inside_forward(model, too_many, error=None):
    """A pre-hook on the first block that runs out of memory, as a real allocation would, in the middle of one of
    memwatch's forwards (eval mode, no grad) when `too_many(input)` says so; it draws from the RNG first, like a
    dropout layer, so a state that is not restored after the exception shows."""

    def hook(module, args):
        if module.training or torch.is_grad_enabled():
            return  # a training step: untouched
        torch.rand(1)
        if too_many(args[0]):
            raise error or RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return model.transformer.h[0].register_forward_pre_hook(hook)


class _StateWatch:
    """Trainer callbacks around memwatch's: training flags, grad mode and the RNG must be as they were after every
    step, evaluations that failed in the middle of a forward included."""

    def __init__(self):
        from transformers import TrainerCallback

        watch = self
        self.checked = 0

        class Before(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                watch.saved = (torch.get_rng_state(), [m.training for m in model.modules()])

        class After(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                rng, flags = watch.saved
                assert torch.equal(torch.get_rng_state(), rng), f"RNG changed at step {state.global_step}"
                assert [m.training for m in model.modules()] == flags
                assert torch.is_grad_enabled()
                watch.checked += 1

        self.before, self.after = Before(), After()


def test_out_of_memory_inside_the_forward_with_the_automatic_batch_size(tmp_path):
    watch = _StateWatch()
    cb = MemWatchCallback(cfg())  # batch_size=None: the automatic size first
    trainer = make_trainer(tmp_path, [watch.before, cb, watch.after], steps=10)
    _oom_inside_forward(trainer.model, lambda x: x.shape[0] > 3)
    trainer.train()
    assert cb.monitor.evaluated_steps == [0, 5, 10] and not cb.monitor.failures
    assert 1 <= cb.monitor.batch_size <= 3 and watch.checked == 10
    # The numbers are those of an extraction that never ran out of memory.
    ref = memwatch.extract(trainer.model, cb.monitor._tokens, prefix_len=K, suffix_len=M, batch_size=3)
    np.testing.assert_array_equal(cb.monitor.last_record.result.exact, ref.exact)
    np.testing.assert_allclose(cb.monitor.last_record.result.entropy, ref.entropy, atol=1e-5)


def test_a_memory_error_of_any_message_is_out_of_memory(tmp_path):
    cb = MemWatchCallback(cfg(batch_size=8))
    trainer = make_trainer(tmp_path, [cb], steps=5)
    _oom_inside_forward(trainer.model, lambda x: x.shape[0] > 2, MemoryError())
    trainer.train()
    assert cb.monitor.evaluated_steps == [0, 5] and not cb.monitor.failures and cb.monitor.batch_size == 2


@pytest.mark.monitor_failures
def test_out_of_memory_at_batch_1_gives_up_and_leaves_the_model_as_it_was(tmp_path):
    watch = _StateWatch()
    cb = MemWatchCallback(cfg(batch_size=4))
    trainer = make_trainer(tmp_path, [watch.before, cb, watch.after], steps=12)
    _oom_inside_forward(trainer.model, lambda x: True)
    trainer.train()
    assert trainer.state.global_step == 12 and watch.checked == 12
    assert cb.monitor.disabled and len([f for f in cb.monitor.failures if "out of memory" in f]) == 3
    assert cb.monitor.batch_size == 1


def test_out_of_memory_while_scoring_exposure(tmp_path):
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries

    rows = [{"input_ids": list(range(i, i + 48)), "labels": list(range(i, i + 48))} for i in range(40)]
    man = make_canaries(ByteTokenizer(), tiers=(4,), per_tier=1, prefix_len=K, secret_len=M, references=40)
    data, man = inject(rows, man)
    cb = MemWatchCallback(cfg(exposure_references=40, batch_size=32), canaries=man)
    trainer = make_trainer(tmp_path, [cb], steps=5, train=data)
    # The exposure pass feeds m - 1 tokens after a shared prefix; more than 8 candidates at once is too many.
    _oom_inside_forward(trainer.model, lambda x: x.shape[1] == M - 1 and x.shape[0] > 8)
    trainer.train()
    assert cb.monitor.evaluated_steps == [0, 5] and not cb.monitor.failures
    assert cb.monitor.batch_size == 8
    exposure = cb.monitor.last_record.exposure
    canaries = np.isin(cb.monitor.panel.groups, ["canary", "canary_heldout"])
    assert np.isfinite(exposure[canaries]).all()
