"""Membership signals and their separation of members from controls, checked against fp64 recomputations, hand
computations and scipy/scikit-learn, and end to end: a model that overfits its training rows separates them."""

from __future__ import annotations

import json
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _models import VOCAB, tiny_model
from scipy.stats import beta
from test_trainer import read_events

from memwatch import AlertConfig, History, Monitor, MonitorConfig, extract
from memwatch.cli import main
from memwatch.signals.membership import (
    _tpr,
    auc,
    clopper_pearson,
    min_k,
    min_k_plus,
    tpr_at_fpr,
)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_statistics_equal_an_fp64_recomputation_and_change_nothing_else(arch):
    model = tiny_model(arch, seed=3)
    x = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(0))
    k, m, w = 12, 12, 4
    with_stats = extract(model, x, prefix_len=k, suffix_len=m, entropy_window=w, token_stats=True)
    without = extract(model, x, prefix_len=k, suffix_len=m, entropy_window=w)
    with torch.no_grad():
        logp = torch.log_softmax(model(x[:, : k + m - 1]).logits.double(), dim=-1)  # [N, k+m-1, V]
    p = logp.exp()
    mean = (p * logp).sum(-1)
    var = (p * logp * logp).sum(-1) - mean**2
    token = logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
    np.testing.assert_allclose(with_stats.token_logprobs, token.numpy(), atol=1e-5)
    np.testing.assert_allclose(with_stats.token_logp_mean, mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(with_stats.token_logp_var, var.numpy(), atol=1e-4)
    assert without.token_logprobs is None
    for name in ("generated", "exact", "prefix_match_len", "entropy", "suffix_nll", "near_tie"):
        np.testing.assert_array_equal(getattr(with_stats, name), getattr(without, name), err_msg=name)
    # the suffix NLL is the mean of the last m token log-probs, negated
    np.testing.assert_allclose(with_stats.suffix_nll, -token[:, -m:].mean(1).numpy(), atol=1e-5)


def test_min_k_and_min_k_plus_by_hand():
    scores = np.array([[-1.0, -5.0, -0.5, -3.0, -2.0, -0.1, -4.0, -0.2, -0.3, -6.0]])
    # k = 20% of 10 tokens: the 2 lowest, -6 and -5
    assert min_k(scores, 0.2)[0] == pytest.approx(-5.5)
    # k = 5% of 10: floor is 0, at least one token
    assert min_k(scores, 0.05)[0] == pytest.approx(-6.0)
    mean = np.full_like(scores, -1.0)
    var = np.full_like(scores, 4.0)
    var[0, 9] = 0.0  # a deterministic position: floored, not a division by zero
    z = [(s + 1.0) / 2.0 for s in scores[0]]
    z[9] = (-6.0 + 1.0) / math.sqrt(1e-6)
    assert min_k_plus(scores, mean, var, 0.2)[0] == pytest.approx(np.mean(sorted(z)[:2]))


def _pairs_auc(member, control):
    """AUC by its definition: the share of (member, control) pairs the score orders right, ties half."""
    wins = sum((a > b) + 0.5 * (a == b) for a in member for b in control)
    return wins / (len(member) * len(control))


def test_auc_tpr_and_intervals_against_their_definitions():
    rng = np.random.default_rng(0)
    member = np.round(rng.normal(1.0, 1.0, 150), 1)  # rounded: ties between the groups
    control = np.round(rng.normal(0.0, 1.0, 300), 1)
    assert auc(member, control) == pytest.approx(_pairs_auc(member, control))
    # TPR at 1% FPR by scanning every threshold: the most members above a threshold that at most 1% of controls pass
    best = 0.0
    for t in np.unique(np.r_[member, control, np.inf]):
        if np.mean(control >= t) <= 0.01:
            best = max(best, float(np.mean(member >= t)))
    tpr, hits = tpr_at_fpr(member, control, 0.01)
    assert tpr == pytest.approx(best) and hits == round(best * len(member))
    # Clopper-Pearson from the beta quantiles
    lo, hi = clopper_pearson(hits, len(member))
    assert lo == pytest.approx(beta.ppf(0.025, hits, len(member) - hits + 1))
    assert hi == pytest.approx(beta.ppf(0.975, hits + 1, len(member) - hits))
    out = _tpr(member, control)
    assert out["tpr_1pct"] == pytest.approx(best) and out["tpr_1pct_lo"] == pytest.approx(lo)
    assert math.isnan(out["tpr_0.1pct"])  # 300 controls: 0.1% FPR needs 1000


def test_tpr_at_low_fpr_is_refused_below_100_controls():
    member, control = np.arange(50.0) + 100, np.arange(99.0)
    out = _tpr(member, control)
    assert all(math.isnan(v) for v in out.values())
    assert auc(member, control) == 1.0  # the AUC itself is reported
    assert not math.isnan(_tpr(member, np.arange(100.0))["tpr_1pct"])


def test_zlib_ratio_of_token_bytes_and_decoded_text(tmp_path):
    from memwatch.signals.membership import _zlib_ratio

    tokens = np.array([[1, 2, 3, 4, 1, 2, 3, 4], [9, 300, 7, 5, 200, 11, 13, 17]])
    ctx = SimpleNamespace(products={}, tokens=tokens, k=4, m=4, values={"loss": np.array([2.0, 3.0])})
    expected = [2.0 / len(zlib.compress(tokens[0].astype("<u2").tobytes(), 9))]
    expected.append(3.0 / len(zlib.compress(tokens[1].astype("<u2").tobytes(), 9)))
    np.testing.assert_allclose(_zlib_ratio(ctx), expected)
    ctx.products = {"window_bytes": [b"aaaaaaaaaaaaaaaa", b"a random line of text"]}
    np.testing.assert_allclose(
        _zlib_ratio(ctx),
        [
            2.0 / len(zlib.compress(b"aaaaaaaaaaaaaaaa", 9)),
            3.0 / len(zlib.compress(b"a random line of text", 9)),
        ],
    )


@pytest.mark.slow
def test_train_heldout_separation_grows_over_training_and_reaches_every_output(tmp_path, capsys):
    """Random token rows: 128 trained on, 128 held out. Untrained, loss cannot tell them apart (AUC ~ 0.5); after
    several epochs the model has overfit its rows and their loss AUC is near 1, with a TPR at 1% FPR reported
    (128 controls)."""
    k = m = 8
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, VOCAB, (256, k + m), generator=g)
    train, heldout = rows[:128], rows[128:]
    model = tiny_model("gpt2", seed=2)
    cfg = MonitorConfig(
        prefix_len=k,
        suffix_len=m,
        entropy_window=4,
        console=False,
        train_probes=128,
        heldout_probes=128,
        alerts=AlertConfig(
            thresholds={"train~heldout/loss_auc": 0.8}, extraction_rate={}, spike=False, leak=False
        ),
    )
    monitor = Monitor(cfg, heldout=[{"input_ids": r.tolist()} for r in heldout])
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in train])
    records = [monitor.evaluate(model, 0)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(1, 4):
        model.train()
        for _ in range(25):
            batch = train[torch.randperm(128, generator=g)[:32]]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        records.append(monitor.evaluate(model, epoch * 25))
    monitor.close()
    aucs = [r.scalars["train~heldout/loss_auc"] for r in records]
    assert aucs[0] < 0.7 and aucs[-1] > 0.95 and aucs[-1] > aucs[0] + 0.3, aucs
    last = records[-1].scalars
    assert 0 < last["train~heldout/loss_tpr_1pct"] <= 1
    assert last["train~heldout/loss_tpr_1pct_lo"] <= last["train~heldout/loss_tpr_1pct"]
    assert math.isnan(last["train~heldout/loss_tpr_0.1pct"])  # 128 controls < 1000: refused
    # min-k%++ separates them too, and the threshold rule on the AUC fired once it crossed 0.8
    assert last["train~heldout/min_k_plus_auc"] > 0.9
    fired = [a for r in records for a in r.alerts if a.rule == "threshold"]
    assert fired and fired[0].data["key"] == "train~heldout/loss_auc"

    events = read_events(str(tmp_path / "memwatch" / "tb" / "train~heldout"))
    series = [e.value for e in events.Scalars("memwatch/pairs/loss_auc")]
    # written once there are enough controls (128 >= 100); the 0.1% one is refused (128 < 1000), never written
    tags = events.Tags()["scalars"]
    assert "memwatch/pairs/loss_tpr_1pct" in tags and "memwatch/pairs/loss_tpr_0.1pct" not in tags
    assert series == pytest.approx(aucs, rel=1e-5)
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows_ = [c for c in report["contrasts"] if c["pair"] == "train~heldout"]
    assert [c["loss_auc"] for c in rows_] == pytest.approx(aucs, rel=1e-5)
    assert rows_[-1]["loss_tpr_0.1pct"] is None and any("0.1%" in n for n in rows_[-1]["notes"])
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "membership" in text and "refused: 128 controls" in text
    with History(
        tmp_path / "memwatch" / "history.sqlite"
    ) as h:  # replayed from the history: the same numbers
        replayed = [c["loss_auc"] for c in h.run().contrasts() if c["pair"] == "train~heldout"]
    assert replayed == pytest.approx(aucs, rel=1e-5)
