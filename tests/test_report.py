"""`memwatch report --format json` on a history whose every value is known."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from memwatch.cli import main
from memwatch.history import HistoryStore

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
        [sys.executable, "-m", "memwatch.cli", "report", str(tmp_path / "out")],
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
