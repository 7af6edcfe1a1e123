"""The embedding view: the probes' mean-pooled prefix representations in TensorBoard's projector, at the first,
every Nth and the last evaluation, with metadata columns, listed in a projector config TensorBoard loads."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from _models import memorizing_panel, trained_model
from google.protobuf import text_format
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from memwatch import Monitor, MonitorConfig


def _config(tb: str) -> ProjectorConfig:
    with open(os.path.join(tb, "projector_config.pbtxt")) as f:
        return text_format.Parse(f.read(), ProjectorConfig())


def test_snapshots_at_the_first_every_nth_and_last_evaluation_with_metadata(tmp_path):
    train, panel = memorizing_panel(16, 16)
    model = trained_model("gpt2", 16, 16)
    cfg = MonitorConfig(
        prefix_len=16, suffix_len=16, entropy_window=8, console=False, heldout_probes=8, embedding_every=2
    )
    heldout = [{"input_ids": r.tolist()} for r in panel[8:]]
    monitor = Monitor(cfg, heldout=heldout)
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in train])
    records = {step: monitor.evaluate(model, step) for step in (0, 10, 20, 30)}
    monitor.finish(model, 35)  # the last evaluation: always a snapshot
    tb = str(tmp_path / "memwatch" / "tb")
    config = _config(tb)
    snapshots = sorted(e.tensor_path.split("/")[0] for e in config.embeddings)
    assert snapshots == ["00000", "00020", "00035"]  # evaluations 1, 3 (every 2nd) and the last
    assert records[10].result.hidden_prefix is None  # not due: not computed at all
    entry = next(e for e in config.embeddings if e.tensor_path.startswith("00020"))
    assert entry.metadata_path and entry.tensor_name
    with open(os.path.join(tb, entry.metadata_path)) as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["probe", "group", "tier", "bucket", "match_ratio", "kind", "exposure"]
    rec = records[20]
    assert [r[0] for r in rows[1:]] == rec.probe_ids and [r[1] for r in rows[1:]] == rec.groups.tolist()
    memorized = rec.values["memorized"].astype(bool)
    assert all((r[5] != "not memorized") == m for r, m in zip(rows[1:], memorized, strict=True))
    tensors = np.loadtxt(os.path.join(tb, entry.tensor_path), delimiter="\t", ndmin=2)
    # The mean-pooled last hidden state of each prefix, recomputed in fp64 (stored as float16)
    tokens = torch.tensor(np.asarray(monitor._tokens))
    with torch.no_grad():
        hidden = model(tokens[:, :31], output_hidden_states=True).hidden_states[-1][:, :16].double().mean(1)
    np.testing.assert_allclose(tensors, hidden.numpy(), atol=2e-3, rtol=2e-3)
    assert oct(os.stat(os.path.join(tb, entry.tensor_path)).st_mode & 0o777) == "0o600"


def test_a_resumed_run_keeps_the_earlier_snapshots_listed(tmp_path):
    train, panel = memorizing_panel(16, 16)
    model = trained_model("gpt2", 16, 16)
    cfg = MonitorConfig(
        prefix_len=16, suffix_len=16, entropy_window=8, console=False, heldout_probes=8, embedding_every=1
    )
    data = [{"input_ids": r.tolist()} for r in train]
    for steps in ((0, 10), (20,)):
        monitor = Monitor(cfg, heldout=[{"input_ids": r.tolist()} for r in panel[8:]])
        monitor.setup(model, output_dir=tmp_path, train_data=data)
        for step in steps:
            monitor.evaluate(model, step)
        monitor.close()
    paths = sorted(e.tensor_path.split("/")[0] for e in _config(str(tmp_path / "memwatch" / "tb")).embeddings)
    assert paths == ["00000", "00010", "00020"]


def test_embedding_every_is_validated():
    from memwatch.config import ConfigError

    with pytest.raises(ConfigError, match="embedding_every"):
        MonitorConfig(embedding_every=0)
    assert MonitorConfig(embedding_every=None).embedding_every is None


def test_the_last_step_evaluated_by_the_cadence_is_the_final_snapshot(tmp_path):
    """A run whose last step falls on the cadence: that evaluation is the last one (finish does not repeat it),
    so it carries the snapshot when the integration says it is the last step (the Trainer callback does)."""
    train, _panel = memorizing_panel(16, 16)
    model = trained_model("gpt2", 16, 16)
    cfg = MonitorConfig(prefix_len=16, suffix_len=16, entropy_window=8, console=False, every_n_steps=10)
    monitor = Monitor(cfg)
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in train])
    for step in range(1, 31):
        monitor.on_step(model, step, last=step == 30)
    monitor.finish(model, 30)
    assert monitor.evaluated_steps == [10, 20, 30]
    snapshots = sorted(
        e.tensor_path.split("/")[0] for e in _config(str(tmp_path / "memwatch" / "tb")).embeddings
    )
    assert snapshots == ["00010", "00030"]
