"""Alerts in a real Trainer run: actions stop and checkpoint, a hanging webhook does not, nothing secret leaks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from test_alerts import _Server
from test_canary_trainer import K, M, canary_setup, make_trainer
from transformers import TrainerCallback

import memwatch
from memwatch import AlertConfig, MemWatchCallback, MonitorConfig
from memwatch.bytetok import ByteTokenizer
from memwatch.posthoc.report import render_html, render_text
from memwatch.store.runs import History, report_dict


def config(**alerts):
    base = {"extraction_rate": {}, "spike": False, "exposure_bits": None}
    return MonitorConfig(
        every_n_steps=25,
        prefix_len=K,
        suffix_len=M,
        train_probes=16,
        heldout_probes=0,
        exposure_references=32,
        console=False,
        alerts=AlertConfig(**{**base, **alerts}),
    )


def test_extracted_canary_saves_a_checkpoint_and_stops_training_at_that_step(tmp_path):
    data, manifest = canary_setup()
    cb = MemWatchCallback(
        config(actions={"canary_extracted": ("save_checkpoint", "stop_training")}), canaries=manifest
    )
    trainer = make_trainer(tmp_path, data, [cb], steps=400)
    trainer.train()
    fired = [a for a in cb.monitor.alerts if a.rule == "canary_extracted"]
    assert fired, "a 64x canary becomes extractable within 400 steps"
    step = fired[0].step
    assert 0 < step < 400 and trainer.state.global_step == step
    assert os.path.isdir(tmp_path / f"checkpoint-{step}")
    assert not any(
        name.startswith("checkpoint-") and name != f"checkpoint-{step}" for name in os.listdir(tmp_path)
    )
    with History(tmp_path) as h:
        report = report_dict(h)
    (recorded,) = [a for a in report["alerts"] if a["rule"] == "canary_extracted"]
    assert recorded["step"] == step and recorded["action"] == "save_checkpoint,stop_training"
    assert recorded["probe_ids"] == fired[0].probe_ids and recorded["group"] == "canary"
    # One canary, one name: the ids the alert gives are the timelines' probe ids, and the canary id the alert
    # prints beside each is the manifest's id of that very probe.
    timelines = {p["id"]: p for p in report["probes"]}
    for pid in fired[0].probe_ids:
        assert timelines[pid]["first_memorized_step"] == step
        cid = timelines[pid]["canary_id"]
        assert f"{pid} (canary {cid}," in fired[0].message and manifest.by_id(cid).inserted
        # ... and the text and HTML reports' timelines name it the same way.
        with History(tmp_path) as h:
            assert f"{pid} (canary {cid})" in render_text(h) and f"{pid} (canary {cid})" in render_html(h)
    lines = [json.loads(x) for x in (tmp_path / "memwatch" / "alerts.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["rule"] == "canary_extracted"] == [step]
    assert oct(os.stat(tmp_path / "memwatch" / "alerts.jsonl").st_mode & 0o777) == "0o600"


def test_training_goes_on_while_a_webhook_post_is_held_open(tmp_path):
    """The server holds each POST until training has moved 10 steps further (or ended): if sending blocked
    training, the first POST would be held until the server's deadline with no step taken meanwhile."""
    progress = {"step": 0, "ended": False}

    class Progress(TrainerCallback):  # placed before memwatch: marks the end before memwatch closes its sinks
        def on_step_end(self, args, state, control, **kwargs):
            progress["step"] = state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            progress["ended"] = True

    held = []

    def hold(body):
        start, deadline = progress["step"], time.monotonic() + 120
        while progress["step"] < start + 10 and not progress["ended"] and time.monotonic() < deadline:
            time.sleep(0.02)
        held.append((start, progress["step"]))

    server = _Server(hold=hold)
    try:
        data, manifest = canary_setup()
        hook = {"webhook_url": server.url, "webhook_timeout": 300.0, "webhook_retries": 0}
        cb = MemWatchCallback(config(**hook), canaries=manifest)
        trainer = make_trainer(tmp_path, data, [Progress(), cb], steps=150)
        trainer.train()
        assert trainer.state.global_step == 150
        assert held and held[0][1] >= held[0][0] + 10, held  # ten steps trained while the first POST was held
        with History(tmp_path) as h:
            assert len(h.store.alerts()) == len(cb.monitor.alerts) == len(server.bodies) > 0
    finally:
        server.close()


def _encodings(tokens: list[int]) -> list[bytes]:
    """A token-id sequence as it could leak: as text (byte-level ids are the text's bytes), as packed int32/int64/
    float32/float64 arrays, and as printed lists."""
    import struct

    out = [bytes(t for t in tokens if t < 256)]
    for fmt in ("<i", "<q", "<f", "<d"):
        out.append(b"".join(struct.pack(fmt, t) for t in tokens))
    for sep in (", ", ",", " "):
        out.append(sep.join(map(str, tokens)).encode())
    return out


def _history_outside_the_probes_table(path) -> list[tuple[str, bytes]]:
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out = []
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        if table == "probes":  # the probes themselves: the one place their tokens live
            continue
        for row in con.execute(f"SELECT * FROM {table}"):
            for value in row:
                data = value if isinstance(value, bytes) else str(value).encode()
                out.append((f"history:{table}", data))
    con.close()
    return out


def _collect_everything(tmp_path, capsys, caplog, reveal):
    """Every sink a run writes, as (source, bytes): stdout and stderr, logs, alerts (JSONL, callable, webhook
    payloads, the history's table), the reports in every format, every TensorBoard event file whole (text,
    histograms, images) and every table of the history but `probes`."""
    from memwatch.cli import main

    server = _Server()
    received = []
    try:
        data, manifest = canary_setup()
        cfg = MonitorConfig(
            every_n_steps=25,
            prefix_len=K,
            suffix_len=M,
            train_probes=16,
            heldout_probes=0,
            exposure_references=32,
            console=True,
            reveal_text=reveal,
            alerts=AlertConfig(
                webhook_url=server.url,
                on_alert=received.append,
                exposure_bits=4.0,
                extraction_rate={"canary": 0.1, "train": 0.01},
                spike_min_evals=2,
            ),
        )
        cb = MemWatchCallback(cfg, canaries=manifest, tokenizer=ByteTokenizer())
        with caplog.at_level("INFO", logger="memwatch"):
            make_trainer(tmp_path, data, [cb], steps=150).train()
        assert {a.rule for a in received} >= {"canary_extracted", "exposure", "extraction_rate"}
        captured = capsys.readouterr()
        sinks = [("stdout", captured.out.encode()), ("stderr", captured.err.encode())]
        sinks.append(("logs", caplog.text.encode()))
        sinks.append(("alerts.jsonl", (tmp_path / "memwatch" / "alerts.jsonl").read_bytes()))
        sinks += [("on_alert", json.dumps(a.to_dict()).encode()) for a in received]
        sinks += [("webhook", json.dumps(b["json"]).encode()) for b in server.bodies]
        history = tmp_path / "memwatch" / "history.sqlite"
        sinks += _history_outside_the_probes_table(history)
        for fmt in ("text", "json", "csv", "html"):
            out = tmp_path / f"report.{fmt}"
            assert main(["report", str(history), "--format", fmt, "--out", str(out)]) == 0
            sinks.append((f"report:{fmt}", out.read_bytes()))
        assert (
            main(["report", str(history), "--format", "pythia-csv", "--out", str(tmp_path / "pythia")]) == 0
        )
        sinks += [("pythia-csv", p.read_bytes()) for p in (tmp_path / "pythia").iterdir()]
        for root, _dirs, files in os.walk(tmp_path / "memwatch" / "tb"):
            sinks += [(f"tensorboard:{f}", Path(root, f).read_bytes()) for f in files]
        with History(tmp_path) as h:
            run = h.run()
            train_windows = [list(t) for t, g in zip(run.tokens, run.groups, strict=True) if g == "train"]
        text = "\n".join(d.decode("utf-8", "replace") for _s, d in sinks)
        return sinks, text, manifest, train_windows
    finally:
        server.close()


def test_no_secret_or_training_text_reaches_any_sink_by_default(tmp_path, capsys, caplog):
    sinks, text, manifest, windows = _collect_everything(tmp_path, capsys, caplog, reveal=False)
    assert "became extractable" in text  # the sinks did receive alerts
    assert any(s.startswith("history:results") for s, _d in sinks) and any("tfevents" in s for s, _d in sinks)
    secrets = [list(c.secret) for c in manifest.canaries]
    contexts = [list(c.tokens[c.secret_start - 12 : c.secret_start]) for c in manifest.canaries]
    # training text: each window's suffix (what extraction reproduces) and its last 12 tokens
    train = [w[K : K + M] for w in windows] + [w[-12:] for w in windows]
    # Training text is real English: a short snippet of it (" control") can be a word memwatch itself writes in its
    # labels and descriptions. A snippet found in memwatch's own source is no evidence of a leak; secrets never are.
    package = Path(memwatch.__file__).parent
    own = b"\n".join(p.read_bytes() for p in package.rglob("*.py"))
    for tokens in secrets + contexts + train:
        for encoded in _encodings(tokens):
            if tokens in train and encoded in own:
                continue
            leaks = [source for source, data in sinks if encoded in data]
            assert not leaks, (bytes(tokens), encoded[:40], leaks)


def test_reveal_text_shows_the_secrets(tmp_path, capsys, caplog):
    _sinks, text, manifest, _ = _collect_everything(tmp_path, capsys, caplog, reveal=True)
    revealed = [c for c in manifest.inserted if c.text[c.secret_char :].strip() in text]
    assert revealed  # the check above can fail: with reveal_text the secrets do appear
