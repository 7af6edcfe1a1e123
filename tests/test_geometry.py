"""The lid signal: pointwise local intrinsic dimension of the prefix representations, against Levina-Bickel by hand."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from _models import VOCAB, tiny_model

from memwatch import Monitor, MonitorConfig
from memwatch.config import ConfigError

pytest.importorskip("skdim")


def _levina_bickel(points: np.ndarray, k: int) -> np.ndarray:
    """(k - 1) / sum_j log(T_k / T_j) over each point's k nearest other points (Levina & Bickel 2004)."""
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    dist = dist[:, 1:]  # the point itself first
    return (k - 1) / np.log(dist[:, -1:] / dist[:, :-1]).sum(axis=1)


def test_lid_equals_levina_bickel_and_sees_a_low_dimensional_cluster():
    from memwatch.signals.geometry import local_intrinsic_dimension

    rng = np.random.default_rng(0)
    flat = np.zeros((60, 32))
    flat[:, :2] = rng.normal(size=(60, 2))  # a 2-dimensional cloud inside 32 dimensions
    full = rng.normal(size=(60, 32)) + 50.0  # far away, all 32 dimensions
    points = np.r_[flat, full]
    lid = local_intrinsic_dimension(points, neighbors=10)
    np.testing.assert_allclose(lid, _levina_bickel(points, 10), rtol=1e-9)
    assert np.median(lid[:60]) < 3 < 8 < np.median(lid[60:])
    assert np.isnan(local_intrinsic_dimension(points[:2])).all()  # too few points: undefined, not a number


def test_lid_at_the_embedding_evaluations_per_group_and_against_the_heldout_control(tmp_path):
    k = m = 8
    rows = torch.randint(0, VOCAB, (48, k + m), generator=torch.Generator().manual_seed(0))
    model = tiny_model("gpt2", seed=3)
    cfg = MonitorConfig(
        prefix_len=k,
        suffix_len=m,
        entropy_window=4,
        console=False,
        tensorboard=False,  # the hidden states are computed for the signal even without the projector
        embedding_every=2,
        signals={"lid": True},
    )
    monitor = Monitor(cfg, heldout=[{"input_ids": r.tolist()} for r in rows[24:]])
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in rows[:24]])
    first, second = monitor.evaluate(model, 0), monitor.evaluate(model, 1)
    monitor.close()
    hidden = first.result.hidden_prefix.astype(np.float64)
    np.testing.assert_allclose(first.values["lid"], _levina_bickel(hidden, 20), rtol=1e-6)
    groups = np.asarray(first.groups)
    assert first.scalars["train/median_lid"] == pytest.approx(
        np.median(first.values["lid"][groups == "train"])
    )
    assert 0 <= first.scalars["train~heldout/lid_auc"] <= 1
    assert (
        second.result.hidden_prefix is None and np.isnan(second.values["lid"]).all()
    )  # not due: not measured


def test_switching_lid_on_without_its_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "skdim" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"needs the optional package 'skdim'.*pip install 'memwatch\[lid\]'"
    ):
        MonitorConfig(signals={"lid": True})
    MonitorConfig()  # off by default: nothing to install


def test_lid_without_the_embedding_view_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\['lid'\], which read the hidden states.*embedding_every=None"):
        MonitorConfig(signals={"lid": True}, embedding_every=None)
