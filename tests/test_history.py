"""The SQLite history: round trip, permissions, schema checks, never truncating someone else's file."""

import os
import sqlite3
import stat

import numpy as np
import pytest

from memwatch.store.history import (
    SCHEMA_VERSION,
    HistoryError,
    HistoryStore,
    decode_floats,
    decode_ints,
    reveal_matches,
)

SPEC = {"prefix_len": 4, "suffix_len": 3, "entropy_window": 2, "mode": "full"}


def _columns(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "exact": rng.random(n) < 0.3,
        "match_ratio": rng.random(n).astype(np.float32),
        "prefix_match_len": rng.integers(0, 3, n),
        "edit_similarity": rng.random(n).astype(np.float32),
        "suffix_nll": rng.random(n).astype(np.float32),
        "near_tie": np.zeros(n, bool),
        "exposure": None,
        "generated": rng.integers(0, 100, (n, 3)).astype(np.int32),
        "entropy": rng.random((n, 5)).astype(np.float32),
    }


def _store_with_run(path, n=5):
    h = HistoryStore(path)
    run = h.add_run("r1", config={"a": 1})
    probes = [
        (f"p{i}", [i, i + 1, i + 2, 7, 8, 9, 10], "train" if i % 2 else "heldout", {"tier": i})
        for i in range(n)
    ]
    h.add_probes(run, probes)
    return h, run


def test_round_trip(tmp_path):
    h, run = _store_with_run(tmp_path / "h.sqlite")
    cols = _columns(5)
    cols["generated"][:, 1] = 9  # the second token reproduced in every row
    eid = h.add_evaluation(
        run,
        10,
        spec=SPEC,
        probe_ids=[f"p{i}" for i in range(5)],
        columns=cols,
        duration=1.5,
        reveal_generated=True,
    )
    hidden = h.add_evaluation(run, 11, spec=SPEC, probe_ids=[f"p{i}" for i in range(5)], columns=cols)
    for r in h.results(
        hidden
    ):  # by default the tokens that differ from the probe's suffix are not kept either
        assert decode_ints(r["generated"])[1] == -1 and set(decode_ints(r["generated"])) <= {-1, -2}
    rows = h.results(eid)
    assert [r["probe_id"] for r in rows] == [f"p{i}" for i in range(5)]
    for i, r in enumerate(rows):
        assert r["exact"] == int(cols["exact"][i])
        assert r["match_ratio"] == pytest.approx(float(cols["match_ratio"][i]))
        # Stored with every token equal to the probe's own suffix hidden (the probes table holds it), revealed on
        # read: the probe tokens are [i, i+1, i+2, 7, 8, 9, 10] and k = 4, m = 3.
        suffix = [8, 9, 10]
        stored = decode_ints(r["generated"])
        assert stored == [-1 if g == t else g for g, t in zip(cols["generated"][i], suffix, strict=True)]
        assert reveal_matches(stored, suffix).tolist() == cols["generated"][i].tolist()
        np.testing.assert_allclose(decode_floats(r["entropy"]), cols["entropy"][i])
        assert r["exposure"] is None
    assert h.panel(run)[3] == {
        "id": "p3",
        "group": "train",
        "meta": {"tier": 3},
        "tokens": [3, 4, 5, 7, 8, 9, 10],
    }
    ev = h.evals(run)
    assert len(ev) == 2 and ev[0]["step"] == 10 and ev[0]["spec"] == SPEC and ev[0]["duration"] == 1.5
    assert h.runs()[0]["config"] == {"a": 1}
    h.close()


def test_same_step_is_replaced_and_truncate_after(tmp_path):
    h, run = _store_with_run(tmp_path / "h.sqlite")
    ids = [f"p{i}" for i in range(5)]
    for step in (0, 10, 20, 30):
        h.add_evaluation(run, step, spec=SPEC, probe_ids=ids, columns=_columns(5, step))
    h.add_evaluation(run, 20, spec=SPEC, probe_ids=ids, columns=_columns(5, 99))  # replaces, not duplicates
    assert [e["step"] for e in h.evals(run)] == [0, 10, 20, 30]
    h.add_alert(run, 30, rule="x", message="m")
    assert h.truncate_after(run, 10) == 2
    assert [e["step"] for e in h.evals(run)] == [0, 10]
    assert h.alerts(run) == []
    assert h.conn.execute("SELECT count(*) FROM results").fetchone()[0] == 10
    assert [r["step"] for r in h.probe_results(run, "p1")] == [0, 10]
    assert h.probe_results(run, "unknown") == []
    h.close()


def test_private_file_modes_wal_and_schema_version(tmp_path):
    path = tmp_path / "sub" / "h.sqlite"
    h, run = _store_with_run(path)
    h.add_evaluation(
        run,
        1,
        spec=SPEC,
        probe_ids=["p0"],
        columns={k: v[:1] if v is not None else None for k, v in _columns(1).items()},
    )
    for p in (path, str(path) + "-wal", str(path) + "-shm"):
        assert os.path.exists(p)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert h.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert h.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {r[0] for r in h.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "evals_by_step" in indexes
    assert h.conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    # Per-step and per-probe reads are key lookups on the clustered results table, not scans.
    for sql in (
        "SELECT exact FROM results WHERE eval_id = ?",
        "SELECT exact FROM results WHERE eval_id = ? AND position = ?",
    ):
        plan = " ".join(
            str(r[-1]) for r in h.conn.execute("EXPLAIN QUERY PLAN " + sql, (1, 0)[: sql.count("?")])
        )
        assert "USING PRIMARY KEY" in plan, plan
    h.close()
    # Reopening continues the same file.
    h2 = HistoryStore(path)
    assert h2.find_run("r1", "live") == run and len(h2.evals(run)) == 1
    h2.close()


def test_refuses_foreign_corrupt_and_newer_files_without_touching_them(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    before = junk.read_bytes()
    with pytest.raises(HistoryError, match="not a readable memwatch history"):
        HistoryStore(junk)
    assert junk.read_bytes() == before

    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = other.read_bytes()
    with pytest.raises(HistoryError, match="not a memwatch history"):
        HistoryStore(other)
    assert other.read_bytes() == before

    newer = tmp_path / "newer.sqlite"
    HistoryStore(newer).close()
    con = sqlite3.connect(newer)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    before = newer.read_bytes()
    with pytest.raises(HistoryError, match="newer memwatch"):
        HistoryStore(newer)
    assert newer.read_bytes() == before

    with pytest.raises(HistoryError, match="no history at"):
        HistoryStore(tmp_path / "missing.sqlite", readonly=True)


def test_a_run_keeps_its_panel(tmp_path):
    h, run = _store_with_run(tmp_path / "h.sqlite", n=3)
    h.add_probes(run, [(f"p{i}", [i] * 7, "train", {}) for i in range(3)])  # the same panel again: fine
    with pytest.raises(HistoryError, match="recorded with another panel"):
        h.add_probes(run, [("other", [9] * 7, "train", {})])
    with pytest.raises(HistoryError, match="not in run"):
        h.add_evaluation(
            run,
            1,
            spec=SPEC,
            probe_ids=["zz"],
            columns={
                "exact": [1],
                "prefix_match_len": [1],
                "suffix_nll": [1.0],
                "near_tie": [0],
                "entropy": [np.zeros(5, np.float32)],
            },
        )
    h.close()


def test_locked_history_is_a_clear_error(tmp_path):
    path = tmp_path / "h.sqlite"
    HistoryStore(path).close()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(HistoryError, match="locked by another process"):
            h = HistoryStore(path, timeout=0.2)
            h.add_run("x")
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_unwritable_location(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(HistoryError, match="cannot create the history"):
        HistoryStore(blocker / "h.sqlite")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(HistoryError, match="cannot create the history"):
            HistoryStore(ro / "h.sqlite")
    finally:
        ro.chmod(0o700)


def _damaged_history(path, n=400, evals=12):
    """A real history of several runs, then 16 KiB in the middle of the file overwritten (a bad disk sector)."""
    h, run = _store_with_run(path, n=n)
    ids = [f"p{i}" for i in range(n)]
    for step in range(evals):
        h.add_evaluation(run, step, spec=SPEC, probe_ids=ids, columns=_columns(n, step))
    h.close()  # the last connection checkpoints the WAL into the file
    assert not os.path.exists(str(path) + "-wal") or os.path.getsize(str(path) + "-wal") == 0
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek((size // 2) // 16384 * 16384)
        f.write(np.random.default_rng(0).integers(0, 256, 16384, dtype=np.uint8).tobytes())
    return path


def test_a_history_damaged_mid_file_is_refused_untouched_and_recoverable(tmp_path):
    from memwatch.store.history import recover

    path = _damaged_history(tmp_path / "h.sqlite")
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(HistoryError, match="is damaged") as err:
            HistoryStore(path, readonly=readonly)
        assert "memwatch recover" in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before
    assert not os.path.exists(str(path) + "-wal") or os.path.getsize(str(path) + "-wal") == 0
    got = recover(path, tmp_path / "new.sqlite")
    assert path.read_bytes() == before
    assert got["runs"] == 1 and got["evaluations"] + got["evaluations_lost"] == 12
    assert got["evaluations_lost"] >= 1 and got["evaluations"] >= 1
    with HistoryStore(tmp_path / "new.sqlite", readonly=True) as new:
        evals = new.evals(new.runs()[0]["run_id"])
        assert len(evals) == got["evaluations"]
        assert all(len(new.results(e["eval_id"])) == 400 for e in evals)
    with pytest.raises(HistoryError, match="exists"):
        recover(path, tmp_path / "new.sqlite")


_WRITER = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_history import SPEC, _columns, _store_with_run

path, mode = sys.argv[1], sys.argv[2]
h, run = _store_with_run(path, n=200)
ids = [f"p{{i}}" for i in range(200)]
for step in range(3):
    h.add_evaluation(run, step, spec=SPEC, probe_ids=ids, columns=_columns(200, step))
if mode == "kill-mid-write":
    real = h.conn.executemany

    class Killer:  # the connection's executemany, cut by SIGKILL half-way through the results of step 3
        def __getattr__(self, name):
            return getattr(h.conn_real, name)

        def executemany(self, sql, rows):
            rows = list(rows)
            if sql.startswith("INSERT INTO results"):
                real(sql, rows[: len(rows) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(sql, rows)

    h.conn_real = h.conn
    h.conn = Killer()
    h.add_evaluation(run, 3, spec=SPEC, probe_ids=ids, columns=_columns(200, 3))
os._exit(0)  # no close: the last transactions live in the WAL only
"""


def _killed_writer(tmp_path, mode):
    import subprocess
    import sys

    path = tmp_path / "h.sqlite"
    script = _WRITER.format(tests=os.path.dirname(__file__))
    subprocess.run([sys.executable, "-c", script, str(path), mode], check=False, timeout=300)
    return path


def test_an_evaluation_cut_by_sigkill_in_the_middle_of_its_write_is_not_half_recorded(tmp_path):
    path = _killed_writer(tmp_path, "kill-mid-write")
    assert os.path.getsize(str(path) + "-wal") > 0  # the run died with its WAL not checkpointed
    with HistoryStore(path, readonly=True) as h:
        run = h.runs()[0]["run_id"]
        assert [e["step"] for e in h.evals(run)] == [0, 1, 2]  # step 3 is not there at all, not half there
        assert h.conn.execute("SELECT count(*) FROM results").fetchone()[0] == 3 * 200
    h = HistoryStore(path)  # and a resumed run can write again
    h.add_evaluation(run, 3, spec=SPEC, probe_ids=[f"p{i}" for i in range(200)], columns=_columns(200, 3))
    assert [e["step"] for e in h.evals(run)] == [0, 1, 2, 3]
    h.close()


def test_a_truncated_wal_loses_at_most_the_last_transactions_and_never_the_file(tmp_path):
    path = _killed_writer(tmp_path, "plain")
    wal = str(path) + "-wal"
    size = os.path.getsize(wal)
    assert size > 0
    with open(wal, "r+b") as f:  # the WAL cut in the middle of its last frames (a crash, a full disk)
        f.truncate(size - 5000)
    with HistoryStore(path, readonly=True) as h:
        steps = [e["step"] for e in h.evals(h.runs()[0]["run_id"])]
        assert steps == list(range(len(steps))) and len(steps) < 3  # the cut transaction is gone, whole
        for e in h.evals(h.runs()[0]["run_id"]):
            assert len(h.results(e["eval_id"])) == 200
