"""The demo end to end, shortened: its summary and its JSON report carry the membership numbers."""

from __future__ import annotations

import json

import pytest

from memwatch.cli import main
from memwatch.demo import DemoSettings, run_demo


@pytest.mark.slow
def test_a_short_demo_reports_membership_in_its_summary_and_json(tmp_path, capsys):
    settings = DemoSettings(
        steps=20,
        every=10,
        out=str(tmp_path),
        live=False,
        tiers=(1, 16),
        exposure_references=32,
        train_bytes=60_000,
    )
    summary = run_demo(settings)
    printed = capsys.readouterr().out
    rows = {(r["pair"], r["signal"]): r for r in summary["membership"]}
    assert set(rows) == {
        ("train~heldout", "loss"),
        ("train~heldout", "min_k_plus"),
        ("canary~canary_heldout", "suffix_nll"),
        ("canary~canary_heldout", "suffix_min_k_plus"),
    }
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows.values())
    # 128 held-out controls: the TPR at 1% FPR is reported with its interval; 4 twins: refused, and said so
    train = rows[("train~heldout", "loss")]
    assert (
        train["tpr_1pct"] is not None
        and train["tpr_1pct_ci"][0] <= train["tpr_1pct"] <= train["tpr_1pct_ci"][1]
    )
    assert rows[("canary~canary_heldout", "suffix_nll")]["tpr_1pct"] is None
    assert "membership" in printed and "refused: < 100 controls" in printed
    assert main(["report", str(tmp_path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    last = [c for c in report["contrasts"] if c["pair"] == "train~heldout" and c["step"] == 20]
    assert last and last[0]["loss_auc"] == pytest.approx(train["auc"], rel=1e-6)
    # The kinds: every memorized probe has exactly one, per group in the summary, the printout and the JSON report;
    # the final evaluation (step 20, on the cadence) wrote its projector snapshot.
    kinds = summary["kinds"]
    assert set(kinds) == {"canary", "canary_heldout", "train", "heldout"}
    for row in kinds.values():
        assert row["recitation"] + row["reconstruction"] + row["recollection"] == row["memorized"]
    assert "kinds of memorization" in printed
    final = [e for e in report["evals"] if e["step"] == 20]
    assert {e["group"] for e in final} == set(kinds)
    assert all(e["recollection_count"] == kinds[e["group"]]["recollection"] for e in final)
    projector = (tmp_path / "memwatch" / "tb" / "projector_config.pbtxt").read_text()
    assert "00000/" in projector and "00020/" in projector
