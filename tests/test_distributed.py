"""The monitor under torch.distributed on CPU (gloo): DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-3 give the one-process
history."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from memwatch.store.history import HistoryStore
from memwatch.store.runs import History

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, kind: str, out, nproc: int) -> str:
    # DeepSpeed on CPU: its CPU accelerator (no CUDA to detect), no op builds.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}
    if nproc == 1:
        cmd = [sys.executable, WORKER, mode, kind, str(out)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            WORKER,
            mode,
            kind,
            str(out),
        ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    launch("monitor", "none", out, 1)
    with History(out) as h:
        return h.run("dist")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp1", "fsdp2", "fsdp1-oom", "zero3"])
def test_two_processes_produce_the_one_process_history(kind, single_process, tmp_path):
    stdout = launch("monitor", kind, tmp_path, 2)
    said = {
        (int(r), int(st)): (a, int(b))
        for r, st, a, b in re.findall(r"rank (\d) step (\d) actions (\[.*?\]) batch (\d+)", stdout)
    }
    # Alert actions are rank 0's decision, broadcast: every rank is told to stop when the train extraction rate
    # alert fires (step 0), and no rank at the other steps.
    for step, actions in ((0, "['stop_training']"), (1, "[]"), (2, "[]")):
        assert said[(0, step)][0] == said[(1, step)][0] == actions, stdout
    # fsdp1-oom: every rank ran out of memory at 3 rows and all retried together, down to 1.
    assert {b for _a, b in said.values()} == ({1} if kind.endswith("-oom") else {3}), stdout
    with History(tmp_path) as h:
        assert len(h.runs) == 1  # rank 0 alone wrote
        run = h.run("dist")
    ref = single_process
    assert run.ids == ref.ids and run.steps.tolist() == ref.steps.tolist() == [0, 1, 2, 3]
    assert len(run.ids) % 2 == 1  # the panel does not divide by two ranks: the last shard was padded
    assert run.group_names() == ["canary", "canary_heldout", "train", "partial"]
    np.testing.assert_array_equal(run.exact, ref.exact)
    np.testing.assert_array_equal(run.generated, ref.generated)
    np.testing.assert_array_equal(run.prefix_match_len, ref.prefix_match_len)
    np.testing.assert_allclose(run.entropy, ref.entropy, atol=1e-5)
    np.testing.assert_allclose(run.suffix_nll, ref.suffix_nll, atol=1e-5)
    np.testing.assert_allclose(run.exposure, ref.exposure, atol=1e-3)  # sharded exposure, gathered in order
    assert np.isfinite(run.exposure[:, np.isin(run.groups, ["canary", "canary_heldout"])]).all()
    # The monitor saw the model change between evaluations (the comparison is not of one frozen model).
    assert not np.allclose(ref.suffix_nll[0], ref.suffix_nll[-1])


@pytest.mark.slow
def test_a_setup_error_on_rank_0_reaches_every_rank(tmp_path):
    stdout = launch("setup_error", "ddp", tmp_path, 2)
    for rank in (0, 1):
        assert f"rank {rank} SetupError: cannot create the history" in stdout, stdout


@pytest.mark.slow
def test_every_rank_follows_rank_0s_adaptive_interval(tmp_path):
    stdout = launch("adaptive", "ddp", tmp_path, 2)
    lines = {
        line.split()[1]: line.split(" evaluated ")[1] for line in stdout.splitlines() if " evaluated " in line
    }
    assert set(lines) == {"0", "1"} and lines["0"] == lines["1"], stdout
    assert "interval None" not in lines["0"]


@pytest.mark.slow
def test_a_trainer_under_ddp_measures_what_one_process_measures(tmp_path):
    launch("trainer", "none-frozen", tmp_path / "one", 1)
    launch("trainer", "ddp-frozen", tmp_path / "two", 2)
    with History(tmp_path / "one") as a, History(tmp_path / "two") as b:
        one, two = a.run(), b.run()
    assert one.ids == two.ids and one.steps.tolist() == two.steps.tolist() == [0, 4, 8, 12]
    np.testing.assert_array_equal(one.exact, two.exact)
    np.testing.assert_array_equal(one.generated, two.generated)
    np.testing.assert_allclose(one.suffix_nll, two.suffix_nll, atol=1e-6)
    np.testing.assert_allclose(one.entropy, two.entropy, atol=1e-6)


@pytest.mark.slow
def test_trainer_under_ddp(tmp_path):
    stdout = launch("trainer", "ddp", tmp_path, 2)
    assert "rank 0 evaluated [0, 4, 8, 12]" in stdout and "rank 1 evaluated [0, 4, 8, 12]" in stdout
    with HistoryStore(tmp_path / "memwatch" / "history.sqlite", readonly=True) as h:
        (run,) = h.runs()
        assert [e["step"] for e in h.evals(run["run_id"])] == [0, 4, 8, 12]
    # Rank 0 only writes: one event file in the root run and in each group's sub-run, never one per rank.
    runs: dict[str, int] = {}
    for folder, _dirs, files in os.walk(tmp_path / "memwatch" / "tb"):
        events = [f for f in files if f.startswith("events.out.tfevents")]
        if events:
            runs[os.path.relpath(folder, tmp_path / "memwatch" / "tb")] = len(events)
    assert runs and set(runs.values()) == {1} and "." in runs and "train" in runs, runs
