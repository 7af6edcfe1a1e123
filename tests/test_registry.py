"""The signal registry is the spine: a signal and a contrast registered here, in this file only, reach the
history, TensorBoard, every report, `compare`, `to_pandas` and the alert rules with no other file edited."""

from __future__ import annotations

import csv
import io
import json
import os
import re

import numpy as np
import pytest
from _models import memorizing_panel, trained_model
from test_trainer import read_events

from memwatch import AlertConfig, History, Monitor, MonitorConfig
from memwatch.cli import main
from memwatch.signals import REGISTRY, Aggregate, Contrast, Signal, register_contrast, register_signal


@pytest.fixture
def registered():
    """A per-probe signal (twice the suffix NLL, membership-like: lower = more member-like) and a contrast (the
    members' mean minus the controls' mean), registered for one test and removed after it."""
    register_signal(
        Signal(
            "doubled_nll",
            "twice the suffix NLL (a test signal)",
            "nats",
            lambda ctx: 2.0 * np.asarray(ctx.values["suffix_nll"], dtype=np.float64),
            direction=-1,
            after=("suffix_nll",),
            membership=True,
            aggregates=(
                Aggregate("mean_doubled_nll", "mean", label="doubled NLL", meaning="mean doubled NLL"),
            ),
        )
    )
    register_contrast(
        Contrast(
            "gap",
            "members' mean minus the controls' mean",
            lambda a, b: {"gap": float(np.mean(a) - np.mean(b))},
        )
    )
    yield
    REGISTRY.remove("doubled_nll")
    REGISTRY.remove("gap")


def test_a_signal_and_a_contrast_registered_in_a_test_reach_every_output(registered, tmp_path, capsys):
    train, panel = memorizing_panel(16, 16)
    model = trained_model("gpt2", 16, 16)
    cfg = MonitorConfig(
        prefix_len=16,
        suffix_len=16,
        entropy_window=8,
        console=False,
        heldout_probes=8,
        alerts=AlertConfig(thresholds={"heldout/mean_doubled_nll": 0.5}, extraction_rate={}, spike=False),
    )
    monitor = Monitor(cfg, heldout=[{"input_ids": r.tolist()} for r in panel[8:]])
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in train])
    records = [monitor.evaluate(model, step) for step in (0, 10)]
    monitor.close()
    rec = records[-1]
    nll = rec.values["suffix_nll"].astype(np.float64)
    np.testing.assert_allclose(rec.values["doubled_nll"], 2 * nll)
    heldout = rec.groups == "heldout"
    assert rec.scalars["heldout/mean_doubled_nll"] == pytest.approx(2 * nll[heldout].mean())
    # The contrast over the pair train~heldout, on the negated signal (direction -1: higher = more member-like).
    gap = np.mean(-2 * nll[rec.groups == "train"]) - np.mean(-2 * nll[heldout])
    assert rec.scalars["train~heldout/doubled_nll_gap"] == pytest.approx(gap)
    # The threshold alert over the new statistic (a held-out NLL is large, far above 0.5).
    assert [a.rule for a in records[0].alerts] == ["threshold"]
    assert records[0].alerts[0].data["key"] == "heldout/mean_doubled_nll"

    path = tmp_path / "memwatch" / "history.sqlite"
    with History(path) as h:
        run = h.run()
        # The history: stored through the signal catalog, no schema change.
        np.testing.assert_allclose(run.signals["doubled_nll"][-1], rec.values["doubled_nll"], rtol=1e-6)
        assert {r["rule"] for r in h.store.alerts()} == {"threshold"}
        frame = h.to_pandas()
    assert "doubled_nll" in frame.columns and len(frame) == 2 * len(run.ids)
    np.testing.assert_allclose(
        frame[frame.step == 10]["doubled_nll"].to_numpy(), rec.values["doubled_nll"], rtol=1e-6
    )

    # TensorBoard, read back: the aggregate in each group's run, the contrast in the pair's run.
    tb = tmp_path / "memwatch" / "tb"
    assert "memwatch/mean_doubled_nll" in read_events(str(tb / "heldout")).Tags()["scalars"]
    pair = read_events(str(tb / "train~heldout"))
    assert [e.step for e in pair.Scalars("memwatch/pairs/doubled_nll_gap")] == [0, 10]

    # The reports: JSON (group rows and contrasts), CSV (a column per signal), text and HTML (headline columns).
    capsys.readouterr()
    assert main(["report", str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = next(r for r in report["evals"] if r["step"] == 10 and r["group"] == "heldout")
    assert row["mean_doubled_nll"] == pytest.approx(rec.scalars["heldout/mean_doubled_nll"], rel=1e-6)
    contrast = next(c for c in report["contrasts"] if c["step"] == 10 and c["pair"] == "train~heldout")
    assert contrast["doubled_nll_gap"] == pytest.approx(gap, rel=1e-5)
    assert main(["report", str(path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert "doubled_nll" in rows[0] and float(rows[-1]["doubled_nll"]) == pytest.approx(
        rec.values["doubled_nll"][-1]
    )
    assert main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    # the group table's headline column, and the membership table's row of the new signal with the new contrast
    assert (
        "doubled NLL" in text
        and re.search(r"train~heldout +doubled_nll .* 17\.406 ", text)
        and " gap " in text
    )
    html = tmp_path / "r.html"
    assert main(["report", str(path), "--format", "html", "--out", str(html)]) == 0
    page = html.read_text()
    assert "doubled NLL" in page and "<td>doubled_nll</td>" in page and "<th>gap</th>" in page

    # compare: the new statistic side by side.
    assert main(["compare", str(path), str(path), "--format", "json"]) == 0
    final = {r["group"]: r for r in json.loads(capsys.readouterr().out)["final"]}
    assert final["heldout"]["mean_doubled_nll"]["b_minus_a"] == 0.0
    assert main(["compare", str(path), str(path)]) == 0
    assert "doubled NLL" in capsys.readouterr().out
    assert os.path.exists(path)


def test_what_no_enabled_statistic_needs_is_not_computed(tmp_path):
    """The engine computes the union of what the enabled signals and statistics need: with the boundary statistics
    switched off, no prefix logits are kept (the entropies cover the suffix only), and nothing is lost elsewhere."""
    train, panel = memorizing_panel(16, 16)
    model = trained_model("gpt2", 16, 16)
    base = dict(
        prefix_len=16, suffix_len=16, entropy_window=8, console=False, heldout_probes=8, tensorboard=False
    )
    heldout = [{"input_ids": r.tolist()} for r in panel[8:]]
    data = [{"input_ids": r.tolist()} for r in train]
    records = {}
    for name, switches in (("all", {}), ("lean", {"boundary": False, "edit_similarity": False})):
        cfg = MonitorConfig(signals=switches, **base)
        monitor = Monitor(cfg, heldout=heldout)
        monitor.setup(model, output_dir=tmp_path / name, train_data=data)
        records[name] = monitor.evaluate(model, 0)
        monitor.close()
        with History(tmp_path / name / "memwatch" / "history.sqlite") as h:
            assert h.run().specs[0]["entropy_window"] == (8 if name == "all" else 0)
    full, lean = records["all"], records["lean"]
    n = len(full.result.exact)
    assert full.result.entropy.shape == (n, 8 + 16) and lean.result.entropy.shape == (n, 16)
    # The suffix's entropies are the same numbers either way; the switched-off statistics are simply absent.
    np.testing.assert_allclose(lean.result.entropy, full.result.entropy[:, 8:], rtol=1e-5, atol=1e-6)
    assert any("boundary_jump" in k for k in full.scalars) and not any("boundary" in k for k in lean.scalars)
    assert "edit_similarity" in full.values and "edit_similarity" not in lean.values
    for key in ("train/extraction_rate", "heldout/mean_suffix_nll", "train/bucket/exact"):
        assert lean.scalars[key] == pytest.approx(full.scalars[key], rel=1e-5)


def test_an_unknown_switch_is_refused_with_the_names_it_takes():
    from memwatch.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown signal.*'nope'.*boundary"):
        MonitorConfig(signals={"nope": False})
