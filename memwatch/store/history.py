"""The per-probe SQLite history: schema, append, resume, queries (standard library only)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import sys
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "MATCH",
    "SCHEMA_VERSION",
    "HistoryError",
    "HistoryStore",
    "decode_floats",
    "decode_ints",
    "recover",
    "reveal_matches",
]

SCHEMA_VERSION = 3  # 1: memwatch 0.1.0; 2: the signal catalog (signals, signal_values); 3: run_state
APPLICATION_ID = 0x6D656D77  # "memw": tells a memwatch history from any other SQLite file
_INTEGER_COLUMNS = ("exact", "prefix_match_len", "near_tie")  # stored as SQLite integers (bools as 0/1)
PAGE_SIZE = 16384  # rows carry ~400 bytes of blobs: larger pages measured ~1.7x faster ingest than 4 KiB
CACHE_KIB = 65536  # a 64 MiB page cache per connection
# Opening an existing history runs SQLite's quick_check for at most this long (a damaged page anywhere in a file of
# a few hundred MB is found; a larger file is checked as far as the budget reaches, and a damaged page beyond it
# is still refused when a read reaches it).
INTEGRITY_SECONDS = 2.0

_SCHEMA = """
CREATE TABLE runs (
    run_id   INTEGER PRIMARY KEY,
    name     TEXT NOT NULL,
    created  REAL NOT NULL,
    source   TEXT NOT NULL,            -- "live" (a training run) or "scan" (post-hoc checkpoints)
    model    TEXT,
    config   TEXT                      -- JSON
);
CREATE TABLE probes (
    probe_id TEXT PRIMARY KEY,         -- content hash of the tokens
    n_tokens INTEGER NOT NULL,
    tokens   BLOB NOT NULL             -- int32 little-endian, stored once for all runs
);
CREATE TABLE run_probes (
    run_id   INTEGER NOT NULL REFERENCES runs(run_id),
    probe_id TEXT NOT NULL REFERENCES probes(probe_id),
    position INTEGER NOT NULL,         -- order in the run's panel; results refer to probes by it
    grp      TEXT NOT NULL,
    meta     TEXT,                     -- JSON (e.g. a canary's tier)
    PRIMARY KEY (run_id, probe_id),
    UNIQUE (run_id, position)
);
CREATE TABLE evals (
    eval_id        INTEGER PRIMARY KEY,
    run_id         INTEGER NOT NULL REFERENCES runs(run_id),
    step           INTEGER NOT NULL,
    wall_time      REAL NOT NULL,
    duration       REAL,
    prefix_len     INTEGER NOT NULL,
    suffix_len     INTEGER NOT NULL,
    entropy_window INTEGER NOT NULL,
    mode           TEXT NOT NULL,
    spec           TEXT NOT NULL,      -- JSON of the four above (and anything else that defines the measurement)
    label          TEXT,               -- e.g. the checkpoint a scan read
    UNIQUE (run_id, step, spec)
);
CREATE INDEX evals_by_step ON evals (run_id, step);
-- One row per (evaluation, probe), clustered by (eval_id, position): an evaluation's rows are contiguous
-- (per-step queries read a key range) and a probe's timeline is one key lookup per evaluation of its run
-- (per-probe queries). A second index on (position, eval_id) would cost ~40% of the ingest rate.
CREATE TABLE results (
    eval_id          INTEGER NOT NULL REFERENCES evals(eval_id),
    position         INTEGER NOT NULL, -- the probe's position in its run's panel (run_probes)
    exact            INTEGER NOT NULL,
    match_ratio      REAL,
    prefix_match_len INTEGER NOT NULL,
    edit_similarity  REAL,
    suffix_nll       REAL NOT NULL,
    near_tie         INTEGER NOT NULL,
    exposure         REAL,
    generated        BLOB,             -- int32 little-endian [m]; -1 where equal to the probe's true suffix
    entropy          BLOB NOT NULL,    -- float32 little-endian [w + m]
    PRIMARY KEY (eval_id, position)
) WITHOUT ROWID;
CREATE TABLE alerts (
    alert_id  INTEGER PRIMARY KEY,
    run_id    INTEGER NOT NULL REFERENCES runs(run_id),
    step      INTEGER NOT NULL,
    wall_time REAL NOT NULL,
    rule      TEXT NOT NULL,
    grp       TEXT,
    probe_ids TEXT,                    -- JSON list
    message   TEXT NOT NULL,
    action    TEXT,
    data      TEXT                     -- JSON
);
CREATE INDEX alerts_by_step ON alerts (run_id, step);
"""
# Schema 2: registered signals beyond the typed result columns, without a schema change per signal. One row per
# (evaluation, signal) holds the values of every probe of the run's panel, in panel order.
# Whether a run is being written, finished or was cut short, and by which process: so a second writer of the same
# run is told, an interrupted run is marked as such, and two runs of one name can be told apart.
_RUN_STATE = """
CREATE TABLE IF NOT EXISTS run_state (
    run_id    INTEGER PRIMARY KEY REFERENCES runs(run_id),
    status    TEXT NOT NULL,          -- running | finished | interrupted | failed
    pid       INTEGER,
    host      TEXT,
    updated   REAL NOT NULL,
    last_step INTEGER
);
"""
RUN_STATUSES = ("running", "finished", "interrupted", "failed")

# Group statistics a replay cannot recompute (GroupStat.kept: they need per-token products the results do not
# hold), kept as numbers: key "<scope>/<stat>", a float64 little-endian blob (one value, or an array).
_EVAL_STATS = """
CREATE TABLE IF NOT EXISTS eval_stats (
    eval_id  INTEGER NOT NULL REFERENCES evals(eval_id),
    key      TEXT NOT NULL,
    is_array INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (eval_id, key)
) WITHOUT ROWID;
"""

_SIGNALS = """
CREATE TABLE signals (
    signal_id INTEGER PRIMARY KEY,
    name      TEXT NOT NULL,
    version   INTEGER NOT NULL,
    unit      TEXT,
    meaning   TEXT,
    UNIQUE (name, version)
);
CREATE TABLE signal_values (
    eval_id   INTEGER NOT NULL REFERENCES evals(eval_id),
    signal_id INTEGER NOT NULL REFERENCES signals(signal_id),
    data      BLOB NOT NULL,           -- float64 little-endian [N], NaN where not measured
    PRIMARY KEY (eval_id, signal_id)
) WITHOUT ROWID;
"""

RESULT_COLUMNS = (
    "exact",
    "match_ratio",
    "prefix_match_len",
    "edit_similarity",
    "suffix_nll",
    "near_tie",
    "exposure",
    "generated",
    "entropy",
)


class HistoryError(RuntimeError):
    """The history file cannot be used; the message says why and what to do. The file is left untouched."""


def _alive_or_stopped(status: str | None, pid: int | None, host: str | None) -> str | None:
    """A "running" run whose process on this host is gone was killed before it could say so: "stopped"."""
    if status != "running" or pid is None or host != socket.gethostname() or os.name == "nt":
        return status  # another host's process cannot be checked from here (nor, safely, on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "stopped"
    except OSError:  # alive and another user's (PermissionError), or not ours to ask about: as recorded
        pass
    return status


def damaged(path: str, detail: str) -> HistoryError:
    """The error for a history with damaged pages: refused, never written, and how to get the rest back."""
    return HistoryError(
        f"{path} is damaged ({detail}); it was left untouched and nothing will be written into it. Record into a "
        f"new history (history_path=... or another output_dir); `memwatch recover {path} NEW.sqlite` copies the "
        "runs and evaluations that are still readable into a new file."
    )


def _reading(method: Any) -> Any:
    """Reads of a damaged file raise HistoryError (one line, the recovery advice), never a raw sqlite3 error."""

    def wrapper(self: HistoryStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from exc

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _le(values: array) -> array:
    """Blobs are little-endian on every machine: swapped in place on a big-endian one."""
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _blob(row: Any, typecode: str) -> bytes:
    if hasattr(row, "tobytes"):  # a numpy row of the right dtype (callers pass int32 / float32 arrays)
        return row.tobytes()
    return array(typecode, row).tobytes()


def decode_floats(blob: bytes | None) -> list[float] | None:
    """A float32 blob back to a list."""
    if blob is None:
        return None
    out = array("f")
    out.frombytes(blob)
    return out.tolist()


MATCH = -1  # a generated token equal to the probe's own suffix token (see HistoryStore._hide_matches)
WITHHELD = -2  # a generated token that differs from it, not kept (reveal_text=False: it may be another text)


def reveal_matches(generated: Any, suffix: Any) -> Any:
    """A stored continuation [.., m] (numpy) with its MATCH entries replaced by the true suffix tokens [.., m]."""
    import numpy as np  # readers of arrays have numpy; the store itself does not need it

    gen = np.asarray(generated)
    return np.where(gen == MATCH, np.asarray(suffix), gen)


def decode_ints(blob: bytes | None) -> list[int] | None:
    """An int32 blob back to a list."""
    if blob is None:
        return None
    out = array("i")
    out.frombytes(blob)
    return out.tolist()


def _create_private(path: str) -> bool:
    """Create `path` with mode 0600 if it does not exist; True if this call created it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class HistoryStore:
    """A memwatch history file. Opening never truncates or overwrites an existing file.

    Raises HistoryError for: a file that is not a memwatch history (or is corrupt), a history written by a newer
    memwatch, a file locked by another writer for longer than `timeout` seconds, or an unwritable location.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, readonly: bool = False, timeout: float = 10.0
    ) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self._positions: dict[int, dict[str, int]] = {}  # run_id -> probe_id -> position
        self._tokens: dict[int, dict[int, list[int]]] = {}  # run_id -> position -> probe tokens
        self._suffixes: dict[tuple[int, int, int], Any] = {}  # (run_id, k, m) -> true suffixes [positions, m]
        self._signal_ids: dict[tuple[str, int], int] = {}
        self.version = SCHEMA_VERSION
        created = False
        if readonly:
            if not os.path.exists(self.path):
                raise HistoryError(
                    f"no history at {self.path}: run a training with memwatch or `memwatch scan` first"
                )
        else:
            from memwatch.store.files import private_makedirs, refuse_link

            parent = os.path.dirname(os.path.abspath(self.path))
            try:
                private_makedirs(parent)
                refuse_link(self.path, "the history")
                created = _create_private(self.path)
            except NotADirectoryError as exc:
                raise HistoryError(f"cannot create the history at {self.path}: {exc}") from exc
            except OSError as exc:
                raise HistoryError(
                    f"cannot create the history at {self.path}: {exc.strerror or exc}. Choose a writable location "
                    "(MonitorConfig(history_path=...) or output_dir=...)."
                ) from exc
        try:
            if readonly:
                uri = "file:" + os.path.abspath(self.path) + "?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
            else:
                self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._check_or_init(created)
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self.conn.close()
            raise self._explain(exc) from exc

    # --- opening ---------------------------------------------------------------------------------------------

    def _explain(self, exc: sqlite3.DatabaseError) -> HistoryError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return HistoryError(
                f"the history {self.path} is locked by another process (another training run or scan writing to it?). "
                "Wait for it to finish, or give this run its own history_path."
            )
        if "malformed" in text or "corrupt" in text:
            return damaged(self.path, text)
        if "not a database" in text:
            return HistoryError(
                f"{self.path} is not a readable memwatch history ({text}); it was left untouched. Move it aside "
                "(or, for a run writing to it, choose another history_path)."
            )
        if "disk is full" in text or "full" in text:
            return HistoryError(
                f"the disk holding {self.path} is full ({text}); free space to keep recording."
            )
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return HistoryError(
                f"cannot write the history {self.path} ({text}); choose a writable history_path."
            )
        return HistoryError(f"cannot use the history {self.path}: {text}")

    def _check_or_init(self, created: bool) -> None:
        c = self.conn
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        version = c.execute("PRAGMA user_version").fetchone()[0]
        n_tables = c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and version == 0 and n_tables == 0:
            if self.readonly:
                raise HistoryError(f"{self.path} is an empty file, not a memwatch history")
            if not created and os.path.getsize(self.path) > 0:
                raise HistoryError(f"{self.path} is not a memwatch history; it was left untouched")
            c.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only possible before the first table and before WAL
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            # executescript commits whatever is pending, so the transaction lives inside the script.
            c.executescript(
                f"BEGIN IMMEDIATE;\n{_SCHEMA}\n{_SIGNALS}\n{_RUN_STATE}\n{_EVAL_STATS}\n"
                f"PRAGMA application_id={APPLICATION_ID};\n"
                f"PRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
            )
            c.execute("PRAGMA synchronous=NORMAL")
            self.version = SCHEMA_VERSION
            return
        if app_id != APPLICATION_ID:
            raise HistoryError(
                f"{self.path} is an SQLite file but not a memwatch history; it was left untouched. Choose another "
                "history_path."
            )
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} was written by a newer memwatch (history schema {version}; this memwatch reads up to "
                f"{SCHEMA_VERSION}). Upgrade memwatch (pip install -U memwatch); the file was left untouched."
            )
        self._check_integrity()  # before any pragma that could write
        if not self.readonly:
            c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.version = version
        if version < SCHEMA_VERSION and not self.readonly:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        """Bring an older history up to SCHEMA_VERSION in place: a full copy of the file first (beside it,
        `<name>.v<version>.bak`), then one transaction that only adds tables; nothing is rewritten or truncated,
        and a failure leaves the file as it was (the copy stays)."""
        backup = f"{self.path}.v{version}.bak"
        if not os.path.exists(backup):
            _create_private(backup)
            target = sqlite3.connect(backup)
            try:
                self.conn.backup(target)
            finally:
                target.close()
        steps = {1: _SIGNALS, 2: _RUN_STATE + _EVAL_STATS}
        script = "".join(steps[v] for v in range(version, SCHEMA_VERSION))
        try:
            self.conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
            )
        except sqlite3.DatabaseError:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        self.version = SCHEMA_VERSION

    def _check_integrity(self) -> None:
        """SQLite's quick_check (every page and B-tree structure; not the index contents), bounded in time.

        A damaged file is refused before anything is appended to it: a run would otherwise record into a history
        that loses its evaluations when it is read."""
        deadline = time.monotonic() + INTEGRITY_SECONDS
        self.conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            rows = self.conn.execute("PRAGMA quick_check(5)").fetchall()
        except sqlite3.OperationalError as exc:
            if "interrupt" not in str(exc):
                raise
            rows = [("ok",)]  # the budget ran out: what was read is fine; reads check the rest as they go
        finally:
            self.conn.set_progress_handler(None, 0)
        problems = [r[0] for r in rows if r[0] != "ok"]
        if problems:
            raise damaged(self.path, "; ".join(problems[:2]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite errors become HistoryError with an explanation, nothing half-written."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from exc
        try:
            yield self.conn
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise self._explain(exc) from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise self._explain(exc) from exc

    # --- writing ---------------------------------------------------------------------------------------------

    def add_run(
        self,
        name: str,
        *,
        source: str = "live",
        model: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> int:
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO runs (name, created, source, model, config) VALUES (?, ?, ?, ?, ?)",
                (name, time.time(), source, model, json.dumps(config or {}, default=str, sort_keys=True)),
            )
            return int(cur.lastrowid)

    def find_run(self, name: str, source: str | None = None) -> int | None:
        """The latest run with this name (and source), or None."""
        sql = (
            "SELECT run_id FROM runs WHERE name = ?"
            + (" AND source = ?" if source else "")
            + " ORDER BY run_id DESC LIMIT 1"
        )
        row = self.conn.execute(sql, (name, source) if source else (name,)).fetchone()
        return None if row is None else int(row[0])

    def add_probes(
        self, run_id: int, probes: Sequence[tuple[str, Sequence[int], str, Mapping[str, Any]]]
    ) -> None:
        """Register a run's panel: (probe_id, tokens, group, meta) in panel order. Tokens are stored once.

        Registering the same panel again (a resumed run or scan) is a no-op; a run's panel cannot change.
        """
        known = self.positions(run_id)
        if known:
            if [pid for pid, *_ in probes] != sorted(known, key=known.__getitem__):
                raise HistoryError(
                    f"run {run_id} in {self.path} was recorded with another panel; use another run_name to record "
                    "a different set of probes"
                )
            return
        self._positions.pop(run_id, None)
        with self.transaction() as c:
            c.executemany(
                "INSERT OR IGNORE INTO probes (probe_id, n_tokens, tokens) VALUES (?, ?, ?)",
                ((pid, len(tok), _blob(tok, "i")) for pid, tok, _g, _m in probes),
            )
            c.executemany(
                "INSERT OR REPLACE INTO run_probes (run_id, probe_id, position, grp, meta) VALUES (?, ?, ?, ?, ?)",
                (
                    (run_id, pid, i, g, json.dumps(dict(m), default=str, sort_keys=True))
                    for i, (pid, _t, g, m) in enumerate(probes)
                ),
            )

    @_reading
    def positions(self, run_id: int) -> dict[str, int]:
        """probe_id -> position in the run's panel."""
        if run_id not in self._positions:
            rows = self.conn.execute("SELECT probe_id, position FROM run_probes WHERE run_id = ?", (run_id,))
            found = dict(rows.fetchall())
            if not found:
                return {}
            self._positions[run_id] = found
        return self._positions[run_id]

    def add_evaluation(
        self,
        run_id: int,
        step: int,
        *,
        spec: Mapping[str, Any],
        probe_ids: Sequence[str],
        columns: Mapping[str, Any],
        wall_time: float | None = None,
        duration: float | None = None,
        label: str | None = None,
        reveal_generated: bool = False,
        signals: Mapping[str, tuple[Any, Any]] | None = None,
        kept: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one evaluation: one results row per probe. Replaces an evaluation at the same run, step and spec.

        columns: RESULT_COLUMNS -> per-row sequences (numpy arrays welcome); "generated" [N, m] int32 rows and
        "entropy" [N, w + m] float32 rows become blobs; absent or None columns are stored as NULL. Generated tokens
        are stored as MATCH / WITHHELD (see _hide_matches) unless reveal_generated keeps the ones that differ.
        signals: the registered signals stored beside the columns, name -> (its Signal, or anything with version,
        unit and meaning; per-probe values [N]); one catalog row per signal and version. kept: group statistics
        a replay cannot recompute, "<scope>/<stat>" -> a number or an array (eval_stats).
        """
        import numpy as np  # callers pass numpy arrays; the module itself imports the standard library only

        n = len(probe_ids)
        spec_json = json.dumps(dict(spec), sort_keys=True)
        positions = self.positions(run_id)
        try:
            pos = [positions[pid] for pid in probe_ids]
        except KeyError as exc:
            raise HistoryError(
                f"probe {exc.args[0]} is not in run {run_id}'s panel (add_probes first)"
            ) from exc

        def col(name: str) -> Sequence[Any]:
            value = columns.get(name)
            if value is None:
                return [None] * n
            if name == "generated":
                value = self._hide_matches(run_id, pos, spec, value, reveal_generated)
            if name in ("generated", "entropy"):
                typecode = "i" if name == "generated" else "f"
                if hasattr(value, "shape") and len(value.shape) == 2 and n:
                    # One tobytes and N bytes slices: ~5x the per-row conversion it replaces.
                    data = np.ascontiguousarray(value, "<i4" if typecode == "i" else "<f4").tobytes()
                    size = len(data) // n
                    return [data[i : i + size] for i in range(0, len(data), size)]
                return [_blob(r, typecode) for r in value]
            if name in _INTEGER_COLUMNS:
                return np.asarray(value).astype(np.int64).tolist()  # bools as 0/1, as SQLite keeps them
            return value.tolist() if hasattr(value, "tolist") else list(value)

        cols = [col(name) for name in RESULT_COLUMNS]
        exact, ratio, pml, sim, nll, tie, expo, gen, ent = cols
        with self.transaction() as c:
            old = c.execute(
                "SELECT eval_id FROM evals WHERE run_id = ? AND step = ? AND spec = ?",
                (run_id, step, spec_json),
            ).fetchone()
            if old is not None:
                c.execute("DELETE FROM results WHERE eval_id = ?", (old[0],))
                c.execute("DELETE FROM signal_values WHERE eval_id = ?", (old[0],))
                if self.version >= 3:
                    c.execute("DELETE FROM eval_stats WHERE eval_id = ?", (old[0],))
                c.execute("DELETE FROM evals WHERE eval_id = ?", (old[0],))
            cur = c.execute(
                "INSERT INTO evals (run_id, step, wall_time, duration, prefix_len, suffix_len, entropy_window, mode,"
                " spec, label) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    int(step),
                    time.time() if wall_time is None else wall_time,
                    duration,
                    int(spec["prefix_len"]),
                    int(spec["suffix_len"]),
                    int(spec["entropy_window"]),
                    str(spec.get("mode", "full")),
                    spec_json,
                    label,
                ),
            )
            eval_id = int(cur.lastrowid)
            rows = list(
                zip([eval_id] * n, pos, exact, ratio, pml, sim, nll, tie, expo, gen, ent, strict=True)
            )
            index = np.asarray(pos, dtype=np.int64)
            if (np.diff(index) < 0).any():  # the panel's own order is already key order
                rows.sort(key=lambda r: r[1])  # in key order: appends to the clustered table
            c.executemany(
                "INSERT INTO results (eval_id, position, exact, match_ratio, prefix_match_len, edit_similarity,"
                " suffix_nll, near_tie, exposure, generated, entropy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            for name, (meta, values) in (signals or {}).items():
                data = np.full(len(positions), np.nan, "<f8")  # float64 little-endian [N] in panel order
                data[index] = np.asarray(values, dtype=np.float64)
                c.execute(
                    "INSERT INTO signal_values (eval_id, signal_id, data) VALUES (?, ?, ?)",
                    (eval_id, self._signal_id(c, name, meta), data.tobytes()),
                )
            for key, value in (kept or {}).items():
                is_array = np.ndim(value) > 0
                blob = np.asarray(value, dtype="<f8").reshape(-1).tobytes()
                c.execute(
                    "INSERT INTO eval_stats (eval_id, key, is_array, data) VALUES (?, ?, ?, ?)",
                    (eval_id, key, int(is_array), blob),
                )
        return eval_id

    def kept_stats(self, eval_id: int) -> dict[str, Any]:
        """An evaluation's kept group statistics: "<scope>/<stat>" -> float, or a list of floats for an array."""
        if self.version < 3:
            return {}
        out: dict[str, Any] = {}
        for key, is_array, data in self.conn.execute(
            "SELECT key, is_array, data FROM eval_stats WHERE eval_id = ?", (eval_id,)
        ):
            values = array("d")
            values.frombytes(data)
            values = _le(values)
            out[key] = list(values) if is_array else values[0]
        return out

    def _signal_id(self, c: sqlite3.Connection, name: str, meta: Any) -> int:
        version = int(getattr(meta, "version", 1))
        key = (name, version)
        if key not in self._signal_ids:
            row = c.execute("SELECT signal_id FROM signals WHERE name = ? AND version = ?", key).fetchone()
            if row is None:
                cur = c.execute(
                    "INSERT INTO signals (name, version, unit, meaning) VALUES (?, ?, ?, ?)",
                    (name, version, getattr(meta, "unit", None), getattr(meta, "meaning", None)),
                )
                row = (cur.lastrowid,)
            self._signal_ids[key] = int(row[0])
        return self._signal_ids[key]

    @_reading
    def signal_values(self, eval_id: int) -> dict[str, array]:
        """An evaluation's registered signals: name -> float64 array [N] in panel order (the latest version)."""
        if self.version < 2:
            return {}
        rows = self.conn.execute(
            "SELECT s.name, s.version, v.data FROM signal_values v JOIN signals s USING (signal_id)"
            " WHERE v.eval_id = ? ORDER BY s.name, s.version",
            (eval_id,),
        )
        out = {}
        for name, _version, data in rows:
            values = array("d")
            values.frombytes(data)
            out[name] = _le(values)
        return out

    def _hide_matches(
        self, run_id: int, positions: Sequence[int], spec: Mapping[str, Any], generated: Any, reveal: bool
    ) -> Any:
        """The greedy continuation as stored: every token that equals the probe's true suffix as MATCH (-1), so what
        a model reproduces of a probe (a canary's secret, training text) lives in the probes table only; every other
        token as WITHHELD (-2) unless `reveal` (a model's continuation of one probe can be another memorized text:
        a training window continued with a canary's secret). Readers put the suffix back (reveal_matches)."""
        k, m = int(spec["prefix_len"]), int(spec["suffix_len"])
        if hasattr(
            generated, "shape"
        ):  # a numpy array: one vectorised comparison, ~10x the pure-Python loop below
            import numpy as np

            truth = self._suffixes.get((run_id, k, m))
            if truth is None:
                panel = self._panel_tokens(run_id)
                truth = np.full((max(panel, default=-1) + 1, m), -3, np.int64)  # -3: no token (never matches)
                for pos, toks in panel.items():
                    row = toks[k : k + m]
                    truth[pos, : len(row)] = row
                self._suffixes[(run_id, k, m)] = truth
            gen = np.asarray(generated, dtype=np.int64)  # [N, m]
            hidden = np.where(
                gen == truth[np.asarray(positions, dtype=np.int64)], MATCH, gen if reveal else WITHHELD
            )
            return hidden.astype("<i4")
        tokens = self._panel_tokens(run_id)
        rows = generated.tolist() if hasattr(generated, "tolist") else generated
        return [
            array(
                "i",
                [
                    MATCH if g == t else (g if reveal else WITHHELD)
                    for g, t in zip(row, tokens[p][k : k + m], strict=True)
                ],
            )
            for row, p in zip(rows, positions, strict=True)
        ]

    def _panel_tokens(self, run_id: int) -> dict[int, list[int]]:
        if run_id not in self._tokens:
            rows = self.conn.execute(
                "SELECT rp.position, p.tokens FROM run_probes rp JOIN probes p USING (probe_id) WHERE rp.run_id = ?",
                (run_id,),
            )
            self._tokens[run_id] = {pos: decode_ints(blob) or [] for pos, blob in rows}
        return self._tokens[run_id]

    def add_alert(
        self,
        run_id: int,
        step: int,
        *,
        rule: str,
        message: str,
        group: str | None = None,
        probe_ids: Sequence[str] = (),
        action: str | None = None,
        data: Mapping[str, Any] | None = None,
        wall_time: float | None = None,
    ) -> int:
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO alerts (run_id, step, wall_time, rule, grp, probe_ids, message, action, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    int(step),
                    time.time() if wall_time is None else wall_time,
                    rule,
                    group,
                    json.dumps(list(probe_ids)),
                    message,
                    action,
                    json.dumps(dict(data or {}), default=str),
                ),
            )
            return int(cur.lastrowid)

    def set_run_status(self, run_id: int, status: str, last_step: int | None = None) -> None:
        """Record that this process is writing run_id ("running"), or how it ended."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}; got {status!r}")
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO run_state (run_id, status, pid, host, updated, last_step) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, status, os.getpid(), socket.gethostname(), time.time(), last_step),
            )

    def claim_run(self, run_id: int) -> dict[str, Any] | None:
        """Mark run_id as written by this process ("running") unless another live process on this host writes it;
        the check and the mark are one transaction, so of two processes resuming one run at once exactly one gets
        it. Returns None when claimed, else the writer that holds it (pid, host)."""
        with self.transaction() as c:
            row = c.execute("SELECT status, pid, host FROM run_state WHERE run_id = ?", (run_id,)).fetchone()
            if (
                row is not None
                and row[1] != os.getpid()
                and row[2] == socket.gethostname()
                and _alive_or_stopped(row[0], row[1], row[2]) == "running"
            ):
                return {"run_id": run_id, "pid": row[1], "host": row[2]}
            c.execute(
                "INSERT OR REPLACE INTO run_state (run_id, status, pid, host, updated, last_step) "
                "VALUES (?, 'running', ?, ?, ?, NULL)",
                (run_id, os.getpid(), socket.gethostname(), time.time()),
            )
        return None

    def live_writers(self, name: str, exclude: int | None = None) -> list[dict[str, Any]]:
        """Runs named `name` that another process is writing now ("running", its process alive)."""
        return [
            r
            for r in self.runs()
            if r["name"] == name
            and r["run_id"] != exclude
            and r["status"] == "running"
            and r["pid"] != os.getpid()
        ]

    def delete_empty_run(self, run_id: int) -> bool:
        """Remove a run that holds no evaluation and no alert (a setup that failed after creating it)."""
        with self.transaction() as c:
            used = c.execute(
                "SELECT (SELECT count(*) FROM evals WHERE run_id = ?) + (SELECT count(*) FROM alerts WHERE run_id = ?)",
                (run_id, run_id),
            ).fetchone()[0]
            if used:
                return False
            c.execute("DELETE FROM run_probes WHERE run_id = ?", (run_id,))
            if self.version >= 3:
                c.execute("DELETE FROM run_state WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        self._positions.pop(run_id, None)
        return True

    def truncate_after(self, run_id: int, step: int) -> int:
        """Delete a run's evaluations and alerts after `step` (a resumed run replaces them); returns how many evals."""
        with self.transaction() as c:
            ids = [
                r[0]
                for r in c.execute("SELECT eval_id FROM evals WHERE run_id = ? AND step > ?", (run_id, step))
            ]
            c.executemany("DELETE FROM results WHERE eval_id = ?", ((i,) for i in ids))
            c.executemany("DELETE FROM signal_values WHERE eval_id = ?", ((i,) for i in ids))
            if self.version >= 3:
                c.executemany("DELETE FROM eval_stats WHERE eval_id = ?", ((i,) for i in ids))
            c.execute("DELETE FROM evals WHERE run_id = ? AND step > ?", (run_id, step))
            c.execute("DELETE FROM alerts WHERE run_id = ? AND step > ?", (run_id, step))
            return len(ids)

    # --- reading ---------------------------------------------------------------------------------------------

    @_reading
    def runs(self) -> list[dict[str, Any]]:
        """Every run: id, name, created (Unix time), source, model, config, and its state: status (running,
        finished, interrupted, failed, "stopped" for a run whose writing process is gone without a word, or None
        when the history predates run states), pid, host, last_step."""
        state = self.version >= 3
        rows = self.conn.execute(
            "SELECT r.run_id, name, created, source, model, config"
            + (
                ", s.status, s.pid, s.host, s.last_step FROM runs r LEFT JOIN run_state s ON s.run_id = r.run_id"
                if state
                else ", NULL, NULL, NULL, NULL FROM runs r"
            )
            + " ORDER BY r.run_id"
        )
        return [
            {
                "run_id": r[0],
                "name": r[1],
                "created": r[2],
                "source": r[3],
                "model": r[4],
                "config": json.loads(r[5] or "{}"),
                "status": _alive_or_stopped(r[6], r[7], r[8]),
                "pid": r[7],
                "host": r[8],
                "last_step": r[9],
            }
            for r in rows
        ]

    @_reading
    def run_config(self, run_id: int) -> dict[str, Any]:
        """The config a run was recorded with ({} if none)."""
        row = self.conn.execute("SELECT config FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row[0] or "{}") if row else {}

    @_reading
    def panel(self, run_id: int) -> list[dict[str, Any]]:
        """A run's probes in panel order: id, group, meta, tokens."""
        rows = self.conn.execute(
            "SELECT rp.probe_id, rp.grp, rp.meta, p.tokens FROM run_probes rp JOIN probes p USING (probe_id)"
            " WHERE rp.run_id = ? ORDER BY rp.position",
            (run_id,),
        )
        return [
            {"id": r[0], "group": r[1], "meta": json.loads(r[2] or "{}"), "tokens": decode_ints(r[3])}
            for r in rows
        ]

    @_reading
    def evals(self, run_id: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT eval_id, step, wall_time, duration, prefix_len, suffix_len, entropy_window, mode, spec, label"
            " FROM evals WHERE run_id = ? ORDER BY step, eval_id",
            (run_id,),
        )
        keys = (
            "eval_id",
            "step",
            "wall_time",
            "duration",
            "prefix_len",
            "suffix_len",
            "entropy_window",
            "mode",
            "spec",
            "label",
        )
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["spec"] = json.loads(d["spec"])
            out.append(d)
        return out

    @_reading
    def results(self, eval_id: int) -> list[dict[str, Any]]:
        """Rows of one evaluation in panel order, with their probe_id (blobs as bytes; see decode_floats / decode_ints)."""
        row = self.conn.execute("SELECT run_id FROM evals WHERE eval_id = ?", (eval_id,)).fetchone()
        if row is None:
            return []
        ids = {pos: pid for pid, pos in self.positions(row[0]).items()}
        cur = self.conn.execute(
            "SELECT position, "
            + ", ".join(RESULT_COLUMNS)
            + " FROM results WHERE eval_id = ? ORDER BY position",
            (eval_id,),
        )
        keys = ("probe_id", *RESULT_COLUMNS)
        return [dict(zip(keys, (ids.get(r[0]), *r[1:]), strict=True)) for r in cur]

    @_reading
    def probe_results(self, run_id: int, probe_id: str) -> list[dict[str, Any]]:
        """One probe's rows across a run's evaluations, by step: one key lookup per evaluation."""
        position = self.positions(run_id).get(probe_id)
        if position is None:
            return []
        keys = ("step", *RESULT_COLUMNS)
        sql = "SELECT " + ", ".join(RESULT_COLUMNS) + " FROM results WHERE eval_id = ? AND position = ?"
        evals = self.conn.execute(
            "SELECT eval_id, step FROM evals WHERE run_id = ? ORDER BY step, eval_id", (run_id,)
        ).fetchall()
        out = []
        for eval_id, step in evals:
            r = self.conn.execute(sql, (eval_id, position)).fetchone()
            if r is not None:
                out.append(dict(zip(keys, (step, *r), strict=True)))
        return out

    @_reading
    def alerts(self, run_id: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT run_id, step, wall_time, rule, grp, probe_ids, message, action, data FROM alerts"
        params: tuple[Any, ...] = ()
        if run_id is not None:
            sql += " WHERE run_id = ?"
            params = (run_id,)
        keys = ("run_id", "step", "wall_time", "rule", "group", "probe_ids", "message", "action", "data")
        out = []
        for r in self.conn.execute(sql + " ORDER BY step, alert_id", params):
            d = dict(zip(keys, r, strict=True))
            d["probe_ids"] = json.loads(d["probe_ids"] or "[]")
            d["data"] = json.loads(d["data"] or "{}")
            out.append(d)
        return out


def recover(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> dict[str, Any]:
    """Copy what is still readable of a (damaged) history into a new one: runs, panels, evaluations whose rows all
    read cleanly, alerts. The source is opened read-only and never changed. Returns counts of what was copied and
    what was lost."""
    src_path, dst_path = os.fspath(source), os.fspath(target)
    if os.path.exists(dst_path):
        raise HistoryError(f"{dst_path} exists; recover writes a new file (choose another name)")
    uri = "file:" + os.path.abspath(src_path) + "?mode=ro"
    try:
        src = sqlite3.connect(uri, uri=True, isolation_level=None)
        src.execute("SELECT count(*) FROM runs").fetchone()
    except sqlite3.DatabaseError as exc:
        raise HistoryError(f"nothing can be read from {src_path} ({exc})") from exc
    summary = {"runs": 0, "evaluations": 0, "evaluations_lost": 0, "alerts": 0, "runs_lost": 0}

    def rows(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
        try:
            return src.execute(sql, params).fetchall()
        except sqlite3.DatabaseError:
            return None

    dst = HistoryStore(dst_path)
    try:
        runs = rows("SELECT run_id, name, created, source, model, config FROM runs ORDER BY run_id") or []
        for run_id, name, created, source_kind, model, config in runs:
            panel = rows(
                "SELECT rp.probe_id, rp.grp, rp.meta, p.tokens FROM run_probes rp JOIN probes p USING (probe_id)"
                " WHERE rp.run_id = ? ORDER BY rp.position",
                (run_id,),
            )
            if not panel:
                summary["runs_lost"] += 1
                continue
            new_id = dst.add_run(name, source=source_kind, model=model, config=json.loads(config or "{}"))
            with dst.transaction() as c:
                c.execute("UPDATE runs SET created = ? WHERE run_id = ?", (created, new_id))
            dst.add_probes(
                new_id,
                [
                    (pid, decode_ints(tok) or [], grp, json.loads(meta or "{}"))
                    for pid, grp, meta, tok in panel
                ],
            )
            summary["runs"] += 1
            evals = rows("SELECT * FROM evals WHERE run_id = ? ORDER BY step, eval_id", (run_id,)) or []
            for ev in evals:
                results = rows("SELECT * FROM results WHERE eval_id = ? ORDER BY position", (ev[0],))
                if results is None or len(results) != len(panel):
                    summary["evaluations_lost"] += 1
                    continue
                with dst.transaction() as c:
                    cur = c.execute(
                        "INSERT INTO evals (run_id, step, wall_time, duration, prefix_len, suffix_len,"
                        " entropy_window, mode, spec, label) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (new_id, *ev[2:]),
                    )
                    eval_id = cur.lastrowid
                    marks = ", ".join("?" * len(results[0]))
                    c.executemany(
                        f"INSERT INTO results VALUES ({marks})", [(eval_id, *r[1:]) for r in results]
                    )
                summary["evaluations"] += 1
            alerts = rows(
                "SELECT step, wall_time, rule, grp, probe_ids, message, action, data FROM alerts WHERE run_id = ?"
                " ORDER BY alert_id",
                (run_id,),
            )
            for step, wall, rule, grp, pids, message, action, data in alerts or []:
                dst.add_alert(
                    new_id,
                    step,
                    rule=rule,
                    message=message,
                    group=grp,
                    probe_ids=json.loads(pids or "[]"),
                    action=action,
                    data=json.loads(data or "{}"),
                    wall_time=wall,
                )
                summary["alerts"] += 1
    finally:
        dst.close()
        src.close()
    return summary
