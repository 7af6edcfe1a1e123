"""A history written by memwatch 0.1.0 (schema 1, committed in tests/fixtures) opens, migrates in place safely
(a backup first, nothing rewritten) and reads the same as it did then."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sqlite3
from pathlib import Path

import pytest

from memwatch import History
from memwatch.cli import main
from memwatch.store.history import SCHEMA_VERSION, HistoryStore

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "history-0.1.0.sqlite"


def _same(old: object, new: object, where: str = "") -> None:
    """`new` holds everything `old` held, equal (floats to 1e-9 relative); keys the registry added are allowed."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}.{key} is gone"
            _same(value, new[key], f"{where}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), (
            f"{where}: {len(old)} entries then, now {new!r:.200}"
        )
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(old, float) and isinstance(new, float):
        assert (math.isnan(old) and math.isnan(new)) or new == pytest.approx(old, rel=1e-9, abs=1e-12), where
    else:
        assert new == old, f"{where}: {old!r} then, {new!r} now"


def _report(path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["report", str(path), "--format", fmt]) == 0
    return capsys.readouterr().out


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_the_0_1_0_fixture_is_schema_1():
    conn = sqlite3.connect(f"file:{FIXTURE}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()
    assert "signals" not in tables and SCHEMA_VERSION > 1


def test_read_only_it_reads_the_same_without_changing_the_file(tmp_path, capsys):
    path = tmp_path / "history.sqlite"
    shutil.copyfile(FIXTURE, path)
    before = path.read_bytes()
    expected = json.loads((FIXTURES / "history-0.1.0.report.json").read_text())
    report = json.loads(_report(path, "json", capsys))
    expected.pop("history")
    _same(expected, report)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.bak"))  # a reader never migrates


def test_opened_for_writing_it_migrates_in_place_with_a_backup_and_reads_the_same(tmp_path, capsys):
    path = tmp_path / "history.sqlite"
    shutil.copyfile(FIXTURE, path)
    before = path.read_bytes()
    with HistoryStore(path) as store:
        assert store.version == SCHEMA_VERSION
    backup = tmp_path / "history.sqlite.v1.bak"
    assert backup.exists()
    with sqlite3.connect(backup) as conn:  # the backup is the old file, whole: same schema, same rows
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    old = sqlite3.connect(f"file:{FIXTURE}?mode=ro", uri=True)
    new = sqlite3.connect(path)
    try:
        assert new.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        for (table,) in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            # nothing rewritten or truncated: every old table has the same rows
            assert (
                old.execute(f"SELECT * FROM {table}").fetchall()
                == new.execute(f"SELECT * FROM {table}").fetchall()
            )
    finally:
        old.close()
        new.close()
    assert len(path.read_bytes()) >= len(before)

    expected = json.loads((FIXTURES / "history-0.1.0.report.json").read_text())
    expected.pop("history")
    _same(expected, json.loads(_report(path, "json", capsys)))
    old_rows = _rows((FIXTURES / "history-0.1.0.report.csv").read_text())
    new_rows = _rows(_report(path, "csv", capsys))
    assert len(new_rows) == len(old_rows)
    for a, b in zip(old_rows, new_rows, strict=True):
        for key, value in a.items():  # columns the registry added are allowed; the old ones are the same
            if value and value.replace(".", "", 1).replace("e-", "", 1).lstrip("-").isdigit():
                assert float(b[key]) == pytest.approx(float(value), rel=1e-9), key
            else:
                assert b[key] == value, key

    # Opening it again is a no-op: no second backup is taken over the first.
    backup_bytes = backup.read_bytes()
    with HistoryStore(path) as store:
        assert store.version == SCHEMA_VERSION
    with History(path) as h:
        assert [r.name for r in h.all_runs()] == ["fixture"]
    assert backup.read_bytes() == backup_bytes and len(list(tmp_path.glob("*.bak"))) == 1
