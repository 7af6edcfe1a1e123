"""Resuming a killed Trainer run continues the same history: nothing duplicated, nothing missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_trainer import read_events

from memwatch.store.runs import History

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")

# transformers < 4.49 cannot resume any Trainer run under torch >= 2.6: it reloads rng_state.pth with torch.load,
# whose weights_only default rejects the numpy arrays in it. Nothing memwatch can do; its resume is tested above.
_tf = tuple(int(x) for x in __import__("transformers").__version__.split(".")[:2])
_torch = tuple(int(x) for x in __import__("torch").__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(
    _tf < (4, 49) and _torch >= (2, 6),
    reason="Trainer resume is broken in transformers < 4.49 with torch >= 2.6",
)


def run(mode: str, out, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, WORKER, mode, str(out), *flags], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    done = run("full", out)
    assert done.returncode == 0, done.stderr[-3000:]
    with History(out) as h:
        return h.run("resume-test"), out


def assert_same(a, b):
    assert a.ids == b.ids
    assert a.steps.tolist() == b.steps.tolist()
    np.testing.assert_array_equal(a.exact, b.exact)
    np.testing.assert_array_equal(a.generated, b.generated)
    np.testing.assert_allclose(a.suffix_nll, b.suffix_nll, atol=1e-6)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("restore_states", [False, True])
def test_killed_and_resumed_run_has_the_uninterrupted_history(uninterrupted, tmp_path, restore_states):
    reference, reference_out = uninterrupted
    flags = ["--restore-callback-states"] if restore_states else []
    killed = run("kill", tmp_path, *flags)
    assert killed.returncode == -signal.SIGKILL
    with History(tmp_path) as h:
        partial = h.run("resume-test")
    assert partial.steps.tolist() == [0, 10, 20, 30, 40, 50]  # step 50 was recorded after checkpoint-40
    assert os.path.isdir(tmp_path / "checkpoint-40") and not os.path.isdir(tmp_path / "checkpoint-60")
    resumed = run("resume", tmp_path, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with History(tmp_path) as h:
        assert len(h.runs) == 1  # the same run continued
        final = h.run("resume-test")
    assert_same(final, reference)
    assert reference.steps.tolist() == [0, 10, 20, 30, 40, 50, 60]
    # TensorBoard: the interrupted run's events after the checkpoint were purged, none duplicated; the
    # transitions after the resume (newly memorized, forgotten) match, so per-probe state was rebuilt.
    acc = read_events(str(tmp_path / "memwatch" / "tb" / "train"))
    ref_acc = read_events(str(reference_out / "memwatch" / "tb" / "train"))
    steps = [e.step for e in acc.Scalars("memwatch/extraction_rate")]
    assert steps == [0, 10, 20, 30, 40, 50, 60]
    for tag in ("memwatch/newly_memorized", "memwatch/forgotten", "memwatch/rememorized"):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [
            (e.step, e.value) for e in ref_acc.Scalars(tag)
        ], tag
    # Non-trivial: probes are memorized at step 50, so a resume that lost its per-probe state would count them all
    # as newly memorized there.
    assert reference.exact[reference.steps.tolist().index(50)].sum() > 0
    # Alerts: the same alerts at the same steps, and the rules end in the same state (cooldowns, baselines).
    with History(tmp_path) as h, History(reference_out) as ref_h:
        alerts = [(a["step"], a["rule"], a["group"], a["message"]) for a in h.store.alerts()]
        ref_alerts = [(a["step"], a["rule"], a["group"], a["message"]) for a in ref_h.store.alerts()]
    assert alerts == ref_alerts
    # Non-trivial: the extraction-rate alert fired before the checkpoint and the rate stays above its threshold, so
    # a resumed run that lost the rule's state (disarmed until the rate falls) would fire it again at step 50.
    assert any(step < 40 and rule == "extraction_rate" for step, rule, _g, _m in ref_alerts)
    state = (tmp_path / "alert_state.json").read_text()
    assert state == (reference_out / "alert_state.json").read_text()


@pytest.mark.slow
def test_resume_from_a_checkpoint_saved_without_memwatch(uninterrupted, tmp_path):
    killed = run("kill", tmp_path, "--no-memwatch")
    assert killed.returncode == -signal.SIGKILL and not os.path.exists(tmp_path / "memwatch")
    resumed = run("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with History(tmp_path) as h:
        final = h.run("resume-test")
    assert final.steps.tolist() == [40, 50, 60]  # a baseline where memwatch joined, then its cadence
    tail, _ = uninterrupted
    idx = [tail.steps.tolist().index(s) for s in (40, 50, 60)]
    np.testing.assert_array_equal(final.exact, tail.exact[idx])
    np.testing.assert_array_equal(final.generated, tail.generated[idx])
