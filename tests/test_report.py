"""`memwatch report --format json` on a history whose every value is known."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from memwatch.cli import main
from memwatch.store.history import HistoryStore

SPEC = {"prefix_len": 4, "suffix_len": 4, "entropy_window": 2, "mode": "full"}


def build_known_history(path):
    """4 probes (2 train, 2 heldout) over 3 evaluations at steps 0, 10, 20.

    train a: 0.0 -> exact -> 0.5 (forgotten at 20); train b: 0.25 -> 0.75 -> exact;
    heldout c: 0.0 throughout; heldout d: exact at 10 only.
    """
    h = HistoryStore(path)
    run = h.add_run("known", config={"memorized_threshold": 1.0, "boundary_width": 1})
    ids = ["a", "b", "c", "d"]
    h.add_probes(
        run,
        [
            (pid, [i] * 8, g, {})
            for i, (pid, g) in enumerate(zip(ids, ["train", "train", "heldout", "heldout"], strict=True))
        ],
    )
    ratios = {0: [0.0, 0.25, 0.0, 0.0], 10: [1.0, 0.75, 0.0, 1.0], 20: [0.5, 1.0, 0.0, 0.0]}
    for step, r in ratios.items():
        r = np.array(r, dtype=np.float32)
        exact = r == 1.0
        entropy = np.tile(np.array([1, 1, 2, 2, 2, 2], dtype=np.float32), (4, 1))
        entropy[exact, 2:] = 0.5
        h.add_evaluation(
            run,
            step,
            spec=SPEC,
            probe_ids=ids,
            columns={
                "exact": exact,
                "match_ratio": r,
                "prefix_match_len": np.round(r * 4).astype(int),
                "edit_similarity": r,
                "suffix_nll": 1 - r,
                "near_tie": np.zeros(4, bool),
                "generated": np.zeros((4, 4), np.int32),
                "entropy": entropy,
            },
        )
    h.close()


def test_json_report_values(tmp_path, capsys):
    path = tmp_path / "h.sqlite"
    build_known_history(path)
    assert main(["report", str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in report["runs"]] == ["known"] and report["runs"][0]["evaluations"] == 3
    evals = {(e["step"], e["group"]): e for e in report["evals"]}
    assert set(evals) == {(s, g) for s in (0, 10, 20) for g in ("train", "heldout")}
    e = evals[(10, "train")]
    assert e["n"] == 2 and e["extracted"] == 1 and e["mean_match_ratio"] == pytest.approx(0.875)
    assert e["buckets"] == {"0-20": 0, "20-40": 0, "40-60": 0, "60-80": 1, "80-99": 0, "exact": 1}
    assert evals[(10, "heldout")]["extracted"] == 1 and evals[(20, "heldout")]["extracted"] == 0
    assert evals[(0, "train")]["mean_suffix_nll"] == pytest.approx(1 - 0.125)
    trans = {(t["from_step"], t["to_step"], t["group"]): np.array(t["matrix"]) for t in report["transitions"]}
    assert set(trans) == {(0, 10, "train"), (0, 10, "heldout"), (10, 20, "train"), (10, 20, "heldout")}
    t = trans[(10, 20, "train")]
    assert t[5, 2] == 1 and t[3, 5] == 1 and t.sum() == 2  # a: exact -> 40-60; b: 60-80 -> exact
    assert trans[(0, 10, "heldout")][0, 5] == 1 and trans[(0, 10, "heldout")][0, 0] == 1
    probes = {p["id"]: p for p in report["probes"]}
    assert probes["a"]["first_memorized_step"] == 10 and probes["a"]["forgotten_steps"] == [20]
    assert probes["b"]["first_memorized_step"] == 20 and probes["b"]["forgotten_steps"] == []
    assert probes["c"]["first_memorized_step"] is None
    assert probes["d"] == {
        **probes["d"],
        "group": "heldout",
        "first_memorized_step": 10,
        "forgotten_steps": [20],
    }


def test_report_accepts_an_output_directory_and_fails_clearly(tmp_path):
    (tmp_path / "out" / "memwatch").mkdir(parents=True)
    build_known_history(tmp_path / "out" / "memwatch" / "history.sqlite")
    ok = subprocess.run(
        [sys.executable, "-m", "memwatch.cli", "report", str(tmp_path / "out"), "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["runs"][0]["name"] == "known"
    missing = subprocess.run(
        [sys.executable, "-m", "memwatch.cli", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no history at" in missing.stderr
    (tmp_path / "bad.sqlite").write_bytes(b"garbage" * 50)
    bad = subprocess.run(
        [sys.executable, "-m", "memwatch.cli", "report", str(tmp_path / "bad.sqlite")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a readable memwatch history" in bad.stderr


def test_help_does_not_import_torch():
    code = "import sys; from memwatch.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_text_report_values(tmp_path, capsys):
    path = tmp_path / "h.sqlite"
    build_known_history(path)
    assert main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    assert "run 1: known" in text
    assert re.search(
        r"\nlive, started [-\d]{10} [:\d]{8}, 3 evaluations, 4 probes\n", text
    )  # finished: no status
    # groups over steps: train at step 10 has 1 of 2 extracted, mean match 0.875
    assert any(line.split()[:6] == ["10", "train", "2", "1", "50.0%", "0.875"] for line in text.splitlines())
    # the transition matrix from the first to the last step, for train: a 0-20 -> 40-60, b 20-40 -> exact
    assert "train: buckets at step 0 (rows) -> step 20 (columns)" in text
    # timelines: a first memorized at 10, forgotten at 20
    assert any(line.split()[:5] == ["a", "train", "10", "20", "-"] for line in text.splitlines())
    assert "entropy across the boundary" in text and "|" in text
    assert main(["report", str(path), "--from-step", "10", "--to-step", "20"]) == 0
    assert "train: buckets at step 10 (rows) -> step 20 (columns)" in capsys.readouterr().out
    assert main(["report", str(path), "--from-step", "7"]) == 2
    assert "no evaluation at step 7" in capsys.readouterr().err


def test_csv_and_pythia_csv(tmp_path, capsys):
    import csv
    import io

    path = tmp_path / "h.sqlite"
    build_known_history(path)
    assert main(["report", str(path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 12
    row = next(r for r in rows if r["step"] == "10" and r["probe_id"] == "b")
    assert (row["group"], row["exact"], float(row["match_ratio"]), row["exposure"]) == (
        "train",
        "0",
        0.75,
        "",
    )
    out = tmp_path / "pythia"
    assert main(["report", str(path), "--format", "pythia-csv", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["known-step0.csv", "known-step10.csv", "known-step20.csv"]
    lines = (out / "known-step10.csv").read_text().splitlines()
    assert lines[0] == "index,score" and lines[1:] == ["0,1.0", "1,0.75"]  # the training sequences only
    capsys.readouterr()
    assert main(["report", str(path), "--format", "pythia-csv"]) == 2
    assert "--format pythia-csv writes one file per checkpoint: give --out DIR" in capsys.readouterr().err
    # Two windows of one example: scored once, by its first window; an exact-mode history is refused.
    h = HistoryStore(tmp_path / "windows.sqlite")
    run = h.add_run("w")
    metas = [
        {"source_index": 7, "start": 40},
        {"source_index": 7, "start": 0},
        {"source_index": 3, "start": 0},
    ]
    h.add_probes(run, [(f"p{i}", [i] * 8, "train", m) for i, m in enumerate(metas)])
    cols = {
        "exact": np.zeros(3, bool),
        "match_ratio": np.array([0.25, 0.5, 0.75], np.float32),
        "prefix_match_len": np.zeros(3, int),
        "suffix_nll": np.ones(3),
        "near_tie": np.zeros(3, bool),
        "entropy": np.zeros((3, 6), np.float32),
    }
    h.add_evaluation(run, 5, spec=SPEC, probe_ids=["p0", "p1", "p2"], columns=cols)
    windows = tmp_path / "windows"
    assert (
        main(["report", str(tmp_path / "windows.sqlite"), "--format", "pythia-csv", "--out", str(windows)])
        == 0
    )
    assert (windows / "w-step5.csv").read_text().splitlines() == ["index,score", "3,0.75", "7,0.5"]
    h.add_evaluation(run, 6, spec={**SPEC, "mode": "exact"}, probe_ids=["p0", "p1", "p2"], columns=cols)
    h.close()
    assert (
        main(["report", str(tmp_path / "windows.sqlite"), "--format", "pythia-csv", "--out", str(out)]) == 2
    )
    assert "mode 'exact' does not measure" in capsys.readouterr().err


def test_html_report_is_self_contained_with_tables_and_charts(tmp_path):
    from html.parser import HTMLParser

    path = tmp_path / "h.sqlite"
    build_known_history(path)
    out = tmp_path / "report.html"
    assert main(["report", str(path), "--format", "html", "--out", str(out)]) == 0
    page = out.read_text()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.captions, self.cells, self._in = [], [], [], None

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self._in = tag

        def handle_data(self, data):
            if self._in == "caption":
                self.captions.append(data)
            if self._in == "td":
                self.cells.append(data)

    p = Collect()
    p.feed(page)
    assert "script" not in p.tags and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and p.tags.count("svg") >= 3
    assert {"Groups over steps", "Probe timelines (3 ever memorized)"} <= set(p.captions)
    assert any(c.startswith("train: transitions, step 0") for c in p.captions)
    assert "87.5%" not in p.cells and "0.875" in p.cells and "50.0%" in p.cells


def test_compare_two_histories(tmp_path, capsys):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    build_known_history(a)
    build_known_history(b)
    from memwatch.store.history import HistoryStore

    with HistoryStore(a) as h:
        created = h.runs()[0]["created"]
    with HistoryStore(b) as h:  # in B, probe b is not memorized at the end
        # the same start second as A (on a slow machine the two may be written a second apart)
        h.conn.execute("UPDATE runs SET created = ?", (created,))
        eid = h.evals(1)[-1]["eval_id"]
        h.conn.execute(
            "UPDATE results SET exact = 0, match_ratio = 0.5 WHERE eval_id = ? AND position = 1", (eid,)
        )
    assert main(["compare", str(a), str(b), "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    train = next(r for r in d["final"] if r["group"] == "train")
    assert train["extraction_rate"] == {"a": 0.5, "b": 0.0, "b_minus_a": -0.5}
    assert {(r["step"], r["group"]) for r in d["common_steps"]} == {
        (s, g) for s in (0, 10, 20) for g in ("train", "heldout")
    }
    assert main(["compare", f"{a}::known", f"{b}::1"]) == 0
    text = capsys.readouterr().out
    # Two runs of one name, the same id, maybe even the same second: told apart by their history files.
    assert re.search(r"A = known #1 \(\w+, started [-\d]{10} [:\d]{8}, step 20, in .*a\.sqlite\)", text), text
    assert re.search(r"B = known #1 \(.*, in .*b\.sqlite\)", text)
    assert any(
        line.split() == ["train", "extraction", "rate", "50.0%", "0.0%", "-50.0%"]
        for line in text.splitlines()
    )
    assert main(["compare", str(a), f"{b}::nope"]) == 2
    assert "no run 'nope' in" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["", "demo", "scan", "report", "compare", "export-tb"])
def test_every_help_answers_without_torch(command):
    code = (
        "import sys\nfrom memwatch.cli import main\ntry:\n"
        f" main({[command, '--help'] if command else ['--help']!r})\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
    assert "usage: memwatch" in out.stdout


@pytest.mark.parametrize("command", [["report"], ["export-tb", "--out", "x"], ["compare", "OTHER"]])
def test_commands_fail_clearly_on_missing_and_corrupt_files(tmp_path, command):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"\x00garbage" * 64)
    from memwatch.store.history import HistoryStore

    HistoryStore(str(tmp_path / "empty.sqlite")).close()  # a valid history without a run
    from test_history import _damaged_history

    damaged = _damaged_history(tmp_path / "damaged.sqlite")
    for target, message in (
        (damaged, "is damaged"),
        (tmp_path / "missing.sqlite", "no history at"),
        (bad, "not a readable memwatch history"),
        (tmp_path / "empty.sqlite", "holds no runs yet"),
    ):
        args = [a.replace("OTHER", str(target)) for a in command]
        run = subprocess.run(
            [sys.executable, "-m", "memwatch.cli", args[0], str(target), *args[1:]],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr


def test_history_library_api_and_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    from memwatch import History

    path = tmp_path / "h.sqlite"
    build_known_history(path)
    with History(path) as h:
        run = h.run("known")
        assert run.steps.tolist() == [0, 10, 20] and run.exact.shape == (3, 4)
        assert run.first_memorized().tolist() == [10, 20, -1, 10]
        df = h.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 12
    row = df[(df.step == 10) & (df.probe_id == "b")].iloc[0]
    assert row.match_ratio == pytest.approx(0.75) and row.group == "train"


def test_a_run_with_two_specs_reads_one(tmp_path):
    from memwatch.store.history import HistoryStore
    from memwatch.store.runs import History

    path = tmp_path / "h.sqlite"
    build_known_history(path)
    with HistoryStore(path) as h:  # the same run measured again at step 20 with another spec
        spec2 = {**SPEC, "suffix_len": 2}
        h.add_evaluation(
            1,
            20,
            spec=spec2,
            probe_ids=["a", "b", "c", "d"],
            columns={
                "exact": np.ones(4, bool),
                "match_ratio": np.ones(4, np.float32),
                "prefix_match_len": np.full(4, 2),
                "suffix_nll": np.zeros(4, np.float32),
                "near_tie": np.zeros(4, bool),
                "entropy": np.zeros((4, 4), np.float32),
                "generated": np.zeros((4, 2), np.int32),
            },
        )
    with History(path) as h:
        latest = h.run()
        assert latest.specs == [spec2] and latest.steps.tolist() == [20] and latest.exact.all()
        first = h.run(spec=SPEC)
        assert first.steps.tolist() == [0, 10, 20]


def test_json_report_does_not_import_torch(tmp_path):
    path = tmp_path / "h.sqlite"
    build_known_history(path)
    code = (
        f"import sys, io, contextlib\nfrom memwatch.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
        f" assert main(['report', {str(path)!r}, '--format', 'json']) == 0\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_recover_command_copies_the_readable_evaluations(tmp_path):
    from test_history import _damaged_history

    damaged = _damaged_history(tmp_path / "damaged.sqlite")
    before = damaged.read_bytes()
    cmd = [sys.executable, "-m", "memwatch.cli"]
    run = subprocess.run(
        [*cmd, "recover", str(damaged), str(tmp_path / "new.sqlite")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "recovered 1 run(s)" in run.stdout and "lost" in run.stdout
    assert damaged.read_bytes() == before
    report = subprocess.run(
        [*cmd, "report", str(tmp_path / "new.sqlite"), "--format", "json"], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    evaluations = json.loads(report.stdout)["runs"][0]["evaluations"]
    assert 1 <= evaluations < 12
