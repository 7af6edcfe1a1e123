"""Output files: owner-only whatever the umask, never written through a planted link, records whole or not at all."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from _models import memorizing_panel, trained_model

from memwatch import Monitor, MonitorConfig
from memwatch.store.files import LinkError, append_line, private_makedirs, read_jsonl


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _monitor_run(out, **cfg):
    """A monitor over a trained model whose train windows are all extracted: the extraction-rate alert fires."""
    train, _ = memorizing_panel(16, 16)
    config = MonitorConfig(prefix_len=16, suffix_len=16, entropy_window=8, console=False, **cfg)
    monitor = Monitor(config)
    model = trained_model("gpt2", 16, 16)
    monitor.setup(model, output_dir=out, train_data=[{"input_ids": r.tolist()} for r in train])
    monitor.evaluate(model, 0)
    monitor.close()
    return monitor


def test_everything_memwatch_creates_is_owner_only_under_umask_000(tmp_path):
    old = os.umask(0)
    try:
        _monitor_run(tmp_path / "run")
    finally:
        os.umask(old)
    out = tmp_path / "run" / "memwatch"
    seen = []
    for root, dirs, files in os.walk(tmp_path / "run"):
        for d in dirs:
            seen.append(d)
            assert _mode(os.path.join(root, d)) == 0o700, d
        for f in files:
            seen.append(f)
            assert _mode(os.path.join(root, f)) == 0o600, f
    assert (out / "alerts.jsonl").exists() and (out / "history.sqlite").exists()
    assert any(name.startswith("events.out.tfevents") for name in seen)


@pytest.mark.monitor_failures
def test_a_link_planted_in_the_output_directory_is_not_followed(tmp_path, caplog):
    out = tmp_path / "run"
    (out / "memwatch").mkdir(parents=True)
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    target.chmod(0o644)
    (out / "memwatch" / "alerts.jsonl").symlink_to(target)
    with caplog.at_level("ERROR", logger="memwatch"):
        monitor = _monitor_run(out)
    assert monitor.alerts, "an alert fired (every train window is extracted)"
    assert target.read_text() == "precious\n" and _mode(target) == 0o644
    assert "jsonl alert sink failed" in caplog.text
    # The history refuses a link too, at setup.
    link = tmp_path / "linked"
    (link / "memwatch").mkdir(parents=True)
    (link / "memwatch" / "history.sqlite").symlink_to(tmp_path / "nowhere.sqlite")
    from memwatch.live.monitor import SetupError

    with pytest.raises(SetupError, match="is a symbolic link"):
        _monitor_run(link)
    assert not (tmp_path / "nowhere.sqlite").exists()


def test_private_makedirs_and_append_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        private_makedirs(blocker / "sub")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dirlink").symlink_to(tmp_path / "dir")
    with pytest.raises(LinkError):
        private_makedirs(tmp_path / "dirlink")
    path = tmp_path / "a.jsonl"
    append_line(path, json.dumps({"n": 1}))
    append_line(path, json.dumps({"n": 2}) + "\n")
    assert [r["n"] for r in read_jsonl(path)] == [1, 2] and _mode(path) == 0o600


_FULL_DISK = """
import json, os, resource, signal, sys
from memwatch.store.files import append_line
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
path = sys.argv[1]
append_line(path, json.dumps({"n": 1}))
size = os.path.getsize(path)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))  # room for part of the next record only
try:
    append_line(path, json.dumps({"n": 2, "pad": "x" * 200}))
    print("no error")
except OSError as exc:
    print("failed", exc.errno)
print("size after failure", os.path.getsize(path), size)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
append_line(path, json.dumps({"n": 3}))
"""


def test_a_full_disk_never_leaves_a_torn_record(tmp_path):
    path = tmp_path / "alerts.jsonl"
    run = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("failed")
    after, before = map(int, lines[1].split()[-2:])
    assert after == before  # the partial bytes were cut off again
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 3]


def test_readers_skip_a_torn_last_line(tmp_path):
    path = tmp_path / "alerts.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n{"n": 3, "mess')  # a process killed in the middle of a write
    assert [r["n"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"n": 1}\n{"n": 2, "mess\n{"n": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        list(read_jsonl(path))
