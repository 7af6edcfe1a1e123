"""Kinds of memorization: templated text (a licence header in training windows and held-out files alike) is
recitation or reconstruction; a random secret remembered by members only is recollection, and an alert on
recollection fires for it alone."""

from __future__ import annotations

import numpy as np
from test_alerts import M, Sim

from memwatch.alerts import AlertEngine
from memwatch.config import AlertConfig
from memwatch.signals.kinds import CONTROL_EXTRACTED, DUPLICATED, TEMPLATE, evidence, kind_of

_ONLY = {
    "extraction_rate": {},
    "spike": False,
    "leak": False,
    "canary_extracted": False,
    "exposure_bits": None,
}


def _panel():
    """Train: two windows of one licence header (the same 4 + M tokens), one of a header whose suffix is a rule
    of '=' (one token repeated), one unmemorized; held-out: a file carrying the same header; canaries: a random
    secret inserted once and its twin (another random secret, never inserted)."""
    rng = np.random.default_rng(0)
    header = rng.integers(10, 90, 4 + M)
    rule = np.r_[rng.integers(10, 90, 4), np.full(M, 61)]
    rows = [header, header, rule, rng.integers(10, 90, 4 + M), header]
    rows += [rng.integers(10, 90, 4 + M), rng.integers(10, 90, 4 + M)]
    groups = ["train", "train", "train", "train", "heldout", "canary", "canary_heldout"]
    metas = [
        {},
        {},
        {},
        {},
        {},
        {"canary_id": "cn-a", "repetitions": 1},
        {"canary_id": "cn-b", "repetitions": 1},
    ]
    return np.array(rows), groups, metas


def test_each_memorized_probe_gets_a_kind_and_its_evidence():
    tokens, groups, metas = _panel()
    memorized = np.array([1, 1, 1, 0, 1, 1, 0], bool)
    bits = evidence(tokens, 4, M, np.array(groups, dtype=object), metas, memorized)
    kinds = kind_of(bits, memorized).tolist()
    assert kinds == ["recitation", "recitation", "reconstruction", "", "recitation", "recollection", ""]
    assert bits[0] & DUPLICATED and bits[0] & CONTROL_EXTRACTED  # also extracted as held-out text
    assert bits[2] == TEMPLATE
    assert bits[5] == 0  # the secret: nothing makes it predictable or common
    # Had the twin been extracted, the canary's secret would be predictable (reconstruction), not recalled.
    twin = memorized.copy()
    twin[6] = True
    assert (
        kind_of(evidence(tokens, 4, M, np.array(groups, dtype=object), metas, twin), twin)[5]
        == "reconstruction"
    )
    # Inserted 64 times: recitation.
    many = [dict(m) for m in metas]
    many[5]["repetitions"] = 64
    assert kind_of(evidence(tokens, 4, M, np.array(groups, dtype=object), many, memorized), memorized)[5] == (
        "recitation"
    )


def test_an_alert_on_recollection_fires_on_the_canary_and_not_on_the_header():
    tokens, groups, metas = _panel()
    sim = Sim(groups, metas, suffixes=tokens[:, 4:])
    sim.tokens = tokens
    record = sim.record(exact=[1, 1, 1, 0, 1, 1, 0])
    assert record.scalars["train/recitation_count"] == 2 and record.scalars["train/reconstruction_count"] == 1
    assert (
        record.scalars["train/recollection_count"] == 0 and record.scalars["canary/recollection_count"] == 1
    )
    assert record.scalars["heldout/recitation_count"] == 1
    engine = AlertEngine(AlertConfig(**_ONLY, thresholds={"*/recollection_count": 1}))
    fired = engine.evaluate(record)
    assert [(a.rule, a.group) for a in fired] == [("threshold", "canary")]
    # Extraction-rate alerts would have fired on the header: the kind is what tells them apart.
    rate = AlertEngine(AlertConfig(**_ONLY, thresholds={"*/extraction_rate": 0.5}))
    assert {a.group for a in rate.evaluate(sim.record(exact=[1, 1, 1, 0, 1, 1, 0]))} >= {"train", "heldout"}
