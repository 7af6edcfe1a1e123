"""Alerts in a real Trainer run: actions stop and checkpoint, a hanging webhook does not, nothing secret leaks."""

from __future__ import annotations

import json
import os
import time

from test_alerts import _Server
from test_canary_trainer import K, M, canary_setup, make_trainer
from transformers import TrainerCallback

from memwatch import AlertConfig, MemWatchCallback, MonitorConfig
from memwatch.analysis import History, report_dict
from memwatch.bytetok import ByteTokenizer


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


def _collect_everything(tmp_path, capsys, caplog, reveal):
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
        texts = [capsys.readouterr().err, caplog.text, (tmp_path / "memwatch" / "alerts.jsonl").read_text()]
        texts += [json.dumps(a.to_dict()) for a in received]
        texts += [json.dumps(b["json"]) for b in server.bodies]
        with History(tmp_path) as h:
            texts.append(json.dumps(h.store.alerts()))
            texts.append(json.dumps(report_dict(h)))
            train_windows = [
                bytes(t).decode("utf-8", "replace")
                for t, g in zip(h.run().tokens, h.run().groups, strict=True)
                if g == "train"
            ]
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "memwatch" / "tb"), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if "alerts" in tag:
                texts += [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
        return "\n".join(texts), manifest, train_windows
    finally:
        server.close()


def test_no_secret_or_training_text_reaches_any_sink_by_default(tmp_path, capsys, caplog):
    everything, manifest, windows = _collect_everything(tmp_path, capsys, caplog, reveal=False)
    assert "became extractable" in everything  # the sinks did receive alerts
    for c in manifest.canaries:
        secret = c.text[c.secret_char :].strip()
        assert secret not in everything, c.id
        assert c.text[: c.secret_char][-12:] not in everything  # nor the sentence around it
    for w in windows:
        assert w[-12:] not in everything


def test_reveal_text_shows_the_secrets(tmp_path, capsys, caplog):
    everything, manifest, _ = _collect_everything(tmp_path, capsys, caplog, reveal=True)
    revealed = [c for c in manifest.inserted if c.text[c.secret_char :].strip() in everything]
    assert revealed  # the check above can fail: with reveal_text the secrets do appear
