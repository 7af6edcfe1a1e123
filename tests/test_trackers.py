"""memwatch's numbers in the user's trackers: W&B (offline) and MLflow (a local SQLite store), read back as written,
from the Trainer's report_to, Accelerate's trackers and Lightning's loggers (the README's snippets, run as written)."""

from __future__ import annotations

import glob
import os
import sqlite3

import numpy as np
import pytest
import torch
from _models import VOCAB, tiny_model
from _readme import run_snippet

from memwatch import AlertConfig, Monitor, MonitorConfig
from memwatch.reporters.trackers import MlflowTarget, TrackerSink, WandbTarget, tracker_metrics
from memwatch.store.runs import History

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

STEPS = [0, 10, 20]


@pytest.fixture
def trackers_env(tmp_path, monkeypatch):
    """W&B offline into tmp_path/wandb, MLflow into a SQLite file (artifacts beside it); nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "memwatch-test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "memwatch-test")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here
    import wandb

    wandb.teardown()  # W&B keeps its settings (WANDB_DIR among them) for the process: start each test afresh
    yield tmp_path
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    wandb.teardown()


def _wandb_records(root) -> list:
    """Every record of the offline W&B run under root, parsed: the .wandb file is a LevelDB-style log (a 7-byte
    header, then 32 KiB blocks of records: crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(str(root), "wandb", "offline-run-*", "run-*.wandb"))
    with open(path, "rb") as f:
        data = f.read()
    pos, buf, block, out = 7, b"", 32768, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
            buf = b""
    records = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _wandb_history(records) -> list[dict]:
    import json

    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def _series(run, stat: str, group: str = "train") -> dict[int, float]:
    return {row["step"]: row[stat] for row in run.group_series() if row["group"] == group}


def _rows(n: int = 16, length: int = 80, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": r.tolist(), "labels": r.tolist()}
        for r in torch.randint(0, VOCAB, (n, length), generator=g)
    ]


def test_the_trainer_s_report_to_trackers_get_memwatch_beside_the_loss(trackers_env):
    import mlflow

    out = str(trackers_env / "run")
    ns = run_snippet(
        "trainer-trackers", model=tiny_model("gpt2"), out=out, train=_rows(), held_out=_rows(8, seed=1)
    )
    assert ns["trainer"].state.global_step == 20
    with History(out) as h:
        run = h.run()
        want = _series(run, "extraction_rate")
        nll = _series(run, "mean_suffix_nll")
    assert sorted(want) == STEPS
    import wandb

    wandb.finish()  # the offline run file holds what was logged once the run is finished (as at process exit)
    # W&B: against the Trainer's own x-axis, beside its loss, without the "train/" prefix its callback adds.
    records = _wandb_records(trackers_env)
    history = _wandb_history(records)
    ours = [r for r in history if "memwatch/train/extraction_rate" in r]
    assert [r["train/global_step"] for r in ours] == STEPS
    for r in ours:
        assert r["memwatch/train/extraction_rate"] == pytest.approx(want[r["train/global_step"]])
        assert r["memwatch/train/mean_suffix_nll"] == pytest.approx(nll[r["train/global_step"]])
        assert r["memwatch/heldout/extraction_rate"] is not None and "memwatch/alerts" in r
    assert any("train/loss" in r for r in history)  # the Trainer's own numbers are there too
    assert not any(k.startswith("train/memwatch") for r in history for k in r)
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (ours_art,) = [a for a in artifacts if a.type == "memwatch"]
    assert {c.path for c in ours_art.manifest.contents} == {"history.sqlite", "report.html"}
    # MLflow: the run the Trainer's callback opened (and ended before memwatch's final evaluation) holds them all.
    client = mlflow.tracking.MlflowClient()
    (mlrun,) = client.search_runs([client.get_experiment_by_name("memwatch-test").experiment_id])
    series = client.get_metric_history(mlrun.info.run_id, "memwatch/train/extraction_rate")
    assert sorted(m.step for m in series) == STEPS
    assert {m.step: m.value for m in series} == pytest.approx(want)
    assert client.get_metric_history(mlrun.info.run_id, "loss")  # the Trainer's loss, in the same run
    names = {a.path for a in client.list_artifacts(mlrun.info.run_id, "memwatch")}
    assert names == {"memwatch/history.sqlite", "memwatch/report.html"}
    local = client.download_artifacts(mlrun.info.run_id, "memwatch/history.sqlite", str(trackers_env / "dl"))
    with History(local) as h:  # a consistent, complete copy of the history
        assert h.run().steps.tolist() == STEPS


def test_alerts_and_every_statistic_reach_wandb_and_mlflow(trackers_env):
    """The tracker sink on a plain Monitor: alerts become W&B alerts and MLflow tags, trackers="all" forwards every
    group statistic (headline: the short set), and a tracker that fails stops neither the others nor memwatch."""
    import mlflow
    import wandb

    run = wandb.init(project="memwatch-test", dir=str(trackers_env))
    mlflow.set_experiment("memwatch-test")
    active = mlflow.start_run()

    class Broken:
        name = "broken"

        def log(self, metrics, step):
            raise RuntimeError("tracker down")

        def alert(self, title, text):
            raise RuntimeError("tracker down")

        def artifacts(self, paths, name):
            raise RuntimeError("tracker down")

    cfg = MonitorConfig(
        prefix_len=16, suffix_len=16, console=False, tensorboard=False, reference=None, embedding_every=None,
        trackers="all", alerts=AlertConfig(thresholds={"user/mean_suffix_nll": 0.0}),
    )  # fmt: skip
    monitor = Monitor(cfg, probes=[r["input_ids"] for r in _rows(6, 32)])
    sink = TrackerSink(
        [Broken(), WandbTarget(run), MlflowTarget(active.info.run_id)], cfg.trackers, run=monitor
    )
    monitor.add_sink(sink)
    model = tiny_model("gpt2")
    monitor.setup(model, output_dir=str(trackers_env / "m"))
    record = monitor.evaluate(model, 0)
    monitor.close()
    run.finish()
    mlflow.end_run()
    assert record.alerts and sink.failed == {"broken"}
    everything = tracker_metrics(record, "all")
    headline = tracker_metrics(record, "headline")
    assert set(headline) < set(everything) and len(everything) > 3 * len(headline)
    assert "memwatch/user/bucket/0-20" in everything and "memwatch/user/bucket/0-20" not in headline
    # W&B: the numbers, the alert, the artifact.
    records = _wandb_records(trackers_env)
    (logged,) = [r for r in _wandb_history(records) if "memwatch/user/extraction_rate" in r]
    for key, value in everything.items():
        assert logged[key] == pytest.approx(value)
    (alert,) = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert alert.title == "memwatch: threshold at step 0" and record.alerts[0].message in alert.text
    assert alert.level == "WARN"
    # MLflow: the same numbers at step 0, the alert as tags.
    client = mlflow.tracking.MlflowClient()
    got = client.get_run(active.info.run_id)
    assert got.data.metrics["memwatch/user/mean_suffix_nll"] == pytest.approx(
        everything["memwatch/user/mean_suffix_nll"]
    )
    assert got.data.tags["memwatch.alerts"] == "1"
    assert record.alerts[0].message in got.data.tags["memwatch.alert.1"]
    names = {a.path for a in client.list_artifacts(active.info.run_id, "memwatch")}
    assert names == {"memwatch/history.sqlite", "memwatch/report.html"}


def test_accelerate_trackers_get_memwatch_at_the_loop_s_steps(trackers_env):
    import mlflow
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = tiny_model("gpt2")
    train = _rows()
    data = [{k: torch.tensor(v) for k, v in row.items()} for row in train]
    out = str(trackers_env / "acc")
    ns = run_snippet(
        "accelerate",
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        loader=DataLoader(data * 10, batch_size=8),
        train=train,
        held_out=_rows(8, seed=1),
        out=out,
    )
    assert ns["step"] == 20
    with History(out) as h:
        want = _series(h.run(), "extraction_rate")
    client = mlflow.tracking.MlflowClient()
    (mlrun,) = client.search_runs([client.get_experiment_by_name("memwatch-test").experiment_id])
    series = client.get_metric_history(mlrun.info.run_id, "memwatch/train/extraction_rate")
    assert {m.step: m.value for m in series} == pytest.approx(want) and sorted(want) == STEPS
    assert len(client.get_metric_history(mlrun.info.run_id, "loss")) == 20


def test_lightning_loggers_get_memwatch_at_the_trainer_s_steps(trackers_env):
    import lightning as L
    from torch.utils.data import DataLoader

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("gpt2")

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    data = [{"input_ids": torch.tensor(r["input_ids"])} for r in _rows()]
    out = str(trackers_env / "pl")
    run_snippet("lightning", module=LM(), loader=DataLoader(data, batch_size=8), out=out)
    import wandb

    wandb.finish()
    with History(out) as h:
        want = _series(h.run(), "extraction_rate")
    history = _wandb_history(_wandb_records(os.path.join(out)))
    ours = [r for r in history if "memwatch/train/extraction_rate" in r]
    assert [r["trainer/global_step"] for r in ours] == STEPS == sorted(want)
    assert [r["memwatch/train/extraction_rate"] for r in ours] == pytest.approx([want[s] for s in STEPS])


def test_trackers_off_and_a_bad_setting_is_refused():
    from memwatch import ConfigError

    with pytest.raises(ConfigError, match="'headline'"):
        MonitorConfig(trackers="wandb")
    assert MonitorConfig(trackers="off").trackers == "off"


def test_the_artifact_copy_of_a_history_is_consistent_while_it_is_being_written(tmp_path):
    """The history goes to the trackers through SQLite's backup API: a copy taken while a write transaction is
    open holds what was committed, never a half-written page."""
    from memwatch.reporters.trackers import _snapshot

    path = str(tmp_path / "h.sqlite")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    conn.commit()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (-1)")  # not committed
    paths = _snapshot(path, str(tmp_path))
    conn.rollback()
    conn.close()
    copy = sqlite3.connect(paths[0])
    assert np.array(copy.execute("SELECT x FROM t").fetchall()).ravel().tolist() == list(range(1000))
