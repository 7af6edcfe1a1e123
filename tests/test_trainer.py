"""End to end with a real transformers.Trainer: memorization appears in the history and in TensorBoard, and the
callback changes nothing about training."""

from __future__ import annotations

import os

import pytest
import torch
from _models import VOCAB, tiny_model
from transformers import Trainer, TrainingArguments

from memwatch import MemWatchCallback, MonitorConfig
from memwatch.signals.buckets import BUCKET_NAMES
from memwatch.store.history import HistoryStore

K, M = 16, 16


def corpus(n_train=16, n_held=8, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = [
        {"input_ids": r.tolist(), "labels": r.tolist()}
        for r in torch.randint(0, VOCAB, (n_train, length), generator=g)
    ]
    held = [
        {"input_ids": r.tolist(), "labels": r.tolist()}
        for r in torch.randint(0, VOCAB, (n_held, length), generator=g)
    ]
    return train, held


def make_trainer(
    out, callbacks=(), steps=150, seed=0, logging_steps=10, train=None, held=None, data_collator=None, **kw
):
    default_train, default_held = corpus()
    options = {
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        **kw,
    }
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, logging_steps=logging_steps, seed=seed, **options
    )
    model = tiny_model("gpt2", seed=seed)  # dropout 0.1 is on: the RNG matters
    return Trainer(
        model=model,
        args=args,
        train_dataset=train if train is not None else default_train,
        eval_dataset=held if held is not None else default_held,
        callbacks=list(callbacks),
        **({"data_collator": data_collator} if data_collator is not None else {}),
    )


def read_events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def memorizing_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cb = MemWatchCallback(
        MonitorConfig(every_n_steps=25, prefix_len=K, suffix_len=M, entropy_window=8, console=False)
    )
    trainer = make_trainer(out, [cb])
    trainer.train()
    return out, cb, trainer


def test_history_holds_every_evaluation_and_memorization_appears(memorizing_run):
    out, cb, _ = memorizing_run
    expected_steps = [0, 25, 50, 75, 100, 125, 150]
    assert cb.monitor.evaluated_steps == expected_steps
    path = os.path.join(out, "memwatch", "history.sqlite")
    with HistoryStore(path, readonly=True) as h:
        (run,) = h.runs()
        evals = h.evals(run["run_id"])
        assert [e["step"] for e in evals] == expected_steps
        panel = h.panel(run["run_id"])
        groups = [p["group"] for p in panel]
        assert groups.count("train") == 16 and groups.count("heldout") == 8
        first = {r["probe_id"]: r for r in h.results(evals[0]["eval_id"])}
        last = {r["probe_id"]: r for r in h.results(evals[-1]["eval_id"])}
        assert len(first) == len(last) == 24
        train_ids = [p["id"] for p in panel if p["group"] == "train"]
        held_ids = [p["id"] for p in panel if p["group"] == "heldout"]
        went_exact = [pid for pid in train_ids if not first[pid]["exact"] and last[pid]["exact"]]
        assert len(went_exact) >= 8, "the model memorizes its training rows during the test"
        assert not any(last[pid]["exact"] for pid in held_ids)
        # The probes are the sequences as trained: the first K + M tokens of the training rows.
        train_rows = {tuple(r["input_ids"][: K + M]) for r in corpus()[0]}
        assert all(tuple(p["tokens"]) in train_rows for p in panel if p["group"] == "train")
    tracker = cb.monitor.tracker
    assert (tracker.first_step[tracker.first_step >= 0] > 0).all()
    last_record = cb.monitor.last_record
    assert last_record.stats["train"].extracted == len([pid for pid in train_ids if last[pid]["exact"]])
    assert sum(last_record.stats["train"].buckets) == 16
    # The entropy boundary: memorized rows stay low after the boundary, unmemorized ones jump.
    boundary = last_record.stats["train"].boundary
    held_boundary = last_record.stats["heldout"].boundary
    assert boundary["exact"][1] < min(post for _pre, post, _jump in held_boundary.values())


def test_tensorboard_event_files_hold_the_documented_tags(memorizing_run):
    """One sub-run per group (so the same tag overlays in distinct colours), run-level tags at the top."""
    out, cb, _ = memorizing_run
    tb = os.path.join(out, "memwatch", "tb")
    acc = read_events(tb)
    tags = acc.Tags()
    steps = cb.monitor.evaluated_steps
    for group in ("train", "heldout"):
        run = read_events(os.path.join(tb, group))
        run_tags = run.Tags()
        for name in (
            "extraction_rate",
            "memorized_rate",
            "mean_match_ratio",
            "mean_edit_similarity",
            "mean_suffix_nll",
            "newly_memorized",
            "forgotten",
            "rememorized",
        ):
            tag = f"memwatch/{name}"
            assert tag in run_tags["scalars"], (group, tag)
            assert [e.step for e in run.Scalars(tag)] == steps, (group, tag)
        for bucket in BUCKET_NAMES:
            assert [e.step for e in run.Scalars(f"memwatch/bucket/{bucket}")] == steps
        assert "memwatch/match_ratio" in run_tags["histograms"]
        images = run.Images("memwatch/entropy_profile")
        assert [e.step for e in images] == steps and images[0].width > 100
    assert "memwatch/eval_seconds" in tags["scalars"]
    train, heldout = read_events(os.path.join(tb, "train")), read_events(os.path.join(tb, "heldout"))
    rates = [e.value for e in train.Scalars("memwatch/extraction_rate")]
    assert rates[0] == 0.0 and rates[-1] >= 0.5
    jumps = [t for t in heldout.Tags()["scalars"] if t.startswith("memwatch/boundary_jump/")]
    assert jumps and all(
        t.replace("boundary_jump", "entropy_pre") in heldout.Tags()["scalars"] for t in jumps
    )
    assert any("custom_scalars" in t for t in tags["tensors"])  # the layout is written
    newly = sum(e.value for e in train.Scalars("memwatch/newly_memorized"))
    assert newly >= 8


def _full_default_path(tmp_path, with_memwatch: bool, server_url: str | None):
    """A run through everything memwatch does by default: canaries pre-flighted through the Trainer's collator,
    exposure, alerts delivered by the webhook thread, gradient accumulation and bf16 autocast on the CPU."""
    from memwatch import AlertConfig
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries

    train, held = corpus(n_train=24)
    manifest = make_canaries(
        ByteTokenizer(), tiers=(4, 16), per_tier=1, prefix_len=K, secret_len=M, references=16, seed=0
    )
    data, manifest = inject(train, manifest)

    def collate(batch):  # a collator of the user's own: memwatch's pre-flight must go through it
        ids = torch.tensor([b["input_ids"][:48] for b in batch])
        return {"input_ids": ids, "labels": ids.clone()}

    callbacks = []
    if with_memwatch:
        cfg = MonitorConfig(
            every_n_steps=7,
            prefix_len=K,
            suffix_len=M,
            console=False,
            exposure_references=16,
            alerts=AlertConfig(webhook_url=server_url, extraction_rate={"train": 0.01}, exposure_bits=1.0),
        )
        callbacks.append(MemWatchCallback(cfg, canaries=manifest))
    trainer = make_trainer(
        tmp_path,
        callbacks,
        steps=30,
        logging_steps=5,
        train=data,
        held=held,
        data_collator=collate,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        bf16=True,  # CPU autocast in bf16: memwatch follows it (amp_dtype='auto')
    )
    trainer.train()
    return trainer, callbacks


def test_the_callback_changes_nothing_about_training(tmp_path):
    from test_alerts import _Server

    server = _Server()
    try:
        with_cb, (cb,) = _full_default_path(tmp_path / "a", True, server.url)
    finally:
        server.close()
    without, _ = _full_default_path(tmp_path / "b", False, None)
    monitor = cb.monitor
    assert monitor.evaluated_steps == [0, 7, 14, 21, 28, 30]  # memwatch really evaluated, at every step due
    assert monitor.amp_dtype == "bf16" and not monitor.failures
    assert monitor.preflight_report is not None and all(monitor.preflight_report.found.values())
    assert monitor.last_record.exposure is not None and monitor.alerts and server.bodies  # the webhook posted
    for (name, p), (_, q) in zip(
        with_cb.model.named_parameters(), without.model.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    losses = lambda t: [(h["step"], h["loss"]) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(with_cb) == losses(without) and len(losses(without)) == 6
    assert [h["step"] for h in with_cb.state.log_history] == [h["step"] for h in without.state.log_history]
    assert os.path.exists(tmp_path / "a" / "memwatch" / "history.sqlite")
    assert not os.path.exists(tmp_path / "b" / "memwatch")


def test_works_without_tokenizer_or_eval_dataset_and_with_completion_only_labels(tmp_path):
    train, _ = corpus(8, 0, length=64)
    for ex in train:  # completion-only: the first 30 tokens are prompt
        ex["labels"] = [-100] * 30 + ex["input_ids"][30:]
    cb = MemWatchCallback(MonitorConfig(every_n_steps=10, prefix_len=K, suffix_len=M, console=False))
    trainer = make_trainer(tmp_path, [cb], steps=10, train=train, held=None)
    trainer.eval_dataset = None
    trainer.train()
    panel = cb.monitor.panel
    assert panel.group_names() == ["train"]
    assert all(p.meta["start"] + K >= 30 for p in panel)  # suffixes only in trained tokens
    assert cb.monitor.evaluated_steps == [0, 10]


@pytest.mark.parametrize("console", [True, False])
def test_the_trainer_closes_with_where_the_files_went(tmp_path, capsys, console):
    """At train end, rank 0 prints one panel: the history, the report and TensorBoard commands (off with the
    console); the TensorBoard directory named holds both the trainer's run and memwatch's."""
    cb = MemWatchCallback(MonitorConfig(every_n_steps=10, prefix_len=K, suffix_len=M, console=console))
    make_trainer(tmp_path, [cb], steps=20, report_to=["tensorboard"]).train()
    err = capsys.readouterr().err
    if not console:
        assert "memwatch report" not in err and "tensorboard --logdir" not in err
        return
    history = os.path.relpath(tmp_path / "memwatch" / "history.sqlite")
    history = str(tmp_path / "memwatch" / "history.sqlite") if history.startswith("..") else history
    assert f"Report:      memwatch report {history}   " in err and "3 evaluation(s), 0 alert(s)" in err
    logdir = err.split("tensorboard --logdir ")[1].split()[0]
    assert os.path.abspath(logdir) == str(tmp_path)
    found = {
        os.path.relpath(root, logdir).split(os.sep)[0]
        for root, _, files in os.walk(logdir)
        for f in files
        if f.startswith("events")
    }
    assert "memwatch" in found and found - {"memwatch"}, (
        found
    )  # the trainer's own events sit beside memwatch's
