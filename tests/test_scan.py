"""Post-hoc scanning: checkpoints of a real Trainer run scanned into the same history the live monitor wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_trainer import K, M, make_trainer, read_events

from memwatch import MemWatchCallback, MonitorConfig
from memwatch.bytetok import ByteTokenizer
from memwatch.cli import main
from memwatch.posthoc.scan import ScanError, find_checkpoints, load_probes
from memwatch.store.runs import History


@pytest.fixture(scope="module")
def trained_with_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    cb = MemWatchCallback(
        MonitorConfig(every_n_steps=25, prefix_len=K, suffix_len=M, entropy_window=8, console=False)
    )
    trainer = make_trainer(out, [cb], steps=75, save_strategy="steps", save_steps=25)
    trainer.train()
    return out


def test_find_checkpoints_reads_steps_from_trainer_state(trained_with_checkpoints, tmp_path):
    ckpts = find_checkpoints([str(trained_with_checkpoints)])
    assert [c.step for c in ckpts] == [25, 50, 75]
    assert all(os.path.basename(c.path) == f"checkpoint-{c.step}" for c in ckpts)
    single = find_checkpoints(
        [str(trained_with_checkpoints / "checkpoint-50"), str(trained_with_checkpoints / "checkpoint-25")]
    )
    assert [c.step for c in single] == [25, 50]
    revs = find_checkpoints(["EleutherAI/pythia-70m"], ["step3000", "step1000"])
    assert [(c.step, c.revision) for c in revs] == [(1000, "step1000"), (3000, "step3000")]
    with pytest.raises(ScanError, match="no such checkpoint"):
        find_checkpoints([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="holds no model"):
        find_checkpoints([str(tmp_path / "empty")])


def test_scanned_history_equals_what_the_live_monitor_recorded(trained_with_checkpoints, tmp_path, capsys):
    out = trained_with_checkpoints
    live_history = out / "memwatch" / "history.sqlite"
    scanned = tmp_path / "scan.sqlite"
    args = [
        str(out),
        "--probes",
        str(live_history),
        "--history",
        str(scanned),  # no --prefix-len / --suffix-len / --entropy-window: the live run's are taken
        "--run-name",
        "scan-of-run",
    ]
    assert main(["scan", *args]) == 0
    err = capsys.readouterr().err
    assert "scanned 3 checkpoint(s)" in err and "checkpoints" in err  # the progress display ran
    with History(live_history) as h:
        live = h.run()
    with History(scanned) as h:
        scan = h.run("scan-of-run")
        assert scan.source == "scan" and scan.labels[0].endswith("checkpoint-25")
        assert scan.specs[0] == {**live.specs[0], "mode": scan.specs[0]["mode"]}
        assert (scan.specs[0]["prefix_len"], scan.specs[0]["suffix_len"], scan.entropy_window) == (K, M, 8)
    assert scan.ids == live.ids and scan.groups.tolist() == live.groups.tolist()
    for step in (25, 50, 75):
        a = int(np.flatnonzero(live.steps == step)[0])
        b = int(np.flatnonzero(scan.steps == step)[0])
        np.testing.assert_array_equal(scan.exact[b], live.exact[a])
        np.testing.assert_array_equal(scan.generated[b], live.generated[a])
        np.testing.assert_array_equal(scan.prefix_match_len[b], live.prefix_match_len[a])
        np.testing.assert_allclose(scan.match_ratio[b], live.match_ratio[a])
        np.testing.assert_allclose(scan.edit_similarity[b], live.edit_similarity[a])
        np.testing.assert_allclose(scan.suffix_nll[b], live.suffix_nll[a], atol=1e-5)
        np.testing.assert_allclose(scan.entropy[b], live.entropy[a], atol=1e-5)
    assert live.exact[-1].sum() > 0  # the comparison covers memorized probes too

    # Resumable: scanning again skips what is recorded.
    assert main(["scan", *args]) == 0
    assert "scanned 0 checkpoint(s), skipped 3" in capsys.readouterr().err

    # export-tb writes the live monitor's tags, with the same values at the same steps.
    tb = tmp_path / "tb"
    assert main(["export-tb", str(scanned), "--out", str(tb)]) == 0
    live_tb = read_events(str(out / "memwatch" / "tb"))
    for run in ("train", "heldout"):  # every sub-run's tags, the same values at the same steps
        exported = read_events(str(tb / "scan-of-run" / run))
        live = read_events(str(out / "memwatch" / "tb" / run))
        assert set(live.Tags()["scalars"]) <= set(exported.Tags()["scalars"])
        for tag in ("memwatch/extraction_rate", "memwatch/mean_suffix_nll", "memwatch/bucket/exact"):
            want = {e.step: e.value for e in live.Scalars(tag) if e.step in (25, 50, 75)}
            got = {e.step: e.value for e in exported.Scalars(tag)}
            assert got.keys() == want.keys() and all(abs(got[s] - want[s]) < 1e-4 for s in want)
        assert [e.step for e in exported.Images("memwatch/entropy_profile")] == [25, 50, 75]
    # The live history exported again: its evaluation timings come along.
    assert main(["export-tb", str(live_history), "--out", str(tmp_path / "tb-live")]) == 0
    (run_dir,) = os.listdir(tmp_path / "tb-live")
    again = read_events(str(tmp_path / "tb-live" / run_dir))
    want = {e.step: e.value for e in live_tb.Scalars("memwatch/eval_seconds")}
    got = {e.step: e.value for e in again.Scalars("memwatch/eval_seconds")}
    assert got.keys() == want.keys() and all(v > 0 and abs(got[s] - v) < 1e-3 for s, v in want.items())


def test_a_scan_that_fails_at_setup_leaves_no_history(tmp_path, trained_with_checkpoints):
    probes = tmp_path / "short.jsonl"
    probes.write_text(json.dumps({"input_ids": list(range(10))}) + "\n")  # shorter than k + m
    history = tmp_path / "s.sqlite"
    code = main(["scan", str(trained_with_checkpoints), "--probes", str(probes), "--history", str(history)])
    assert code == 2 and not os.path.exists(history)


def test_probe_files_jsonl_and_errors(tmp_path, trained_with_checkpoints, capsys):
    jsonl = tmp_path / "probes.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"text": "x" * 40, "group": "pii", "id": "a"}),
                json.dumps({"input_ids": list(range(40))}),
                "",
            ]
        )
    )
    items, manifest = load_probes(str(jsonl), tokenizer=ByteTokenizer())
    assert manifest is None and len(items) == 2 and items[0]["group"] == "pii"
    with pytest.raises(ScanError, match="give --tokenizer"):
        load_probes(str(jsonl))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ScanError, match="line 2: not JSON"):
        load_probes(str(bad), tokenizer=ByteTokenizer())
    scanned = tmp_path / "s.sqlite"
    assert (
        main(
            [
                "scan",
                str(trained_with_checkpoints / "checkpoint-75"),
                "--probes",
                str(jsonl),
                "--history",
                str(scanned),
                "--prefix-len",
                "16",
                "--suffix-len",
                "16",
                "--tokenizer",
                "none",
            ]
        )
        == 2
    )
    assert "holds texts: give --tokenizer" in capsys.readouterr().err
    ids_only = tmp_path / "ids.jsonl"
    ids_only.write_text(json.dumps({"input_ids": list(range(40)), "group": "mine"}) + "\n")
    assert (
        main(
            [
                "scan",
                str(trained_with_checkpoints / "checkpoint-75"),
                "--probes",
                str(ids_only),
                "--history",
                str(scanned),
                "--prefix-len",
                "16",
                "--suffix-len",
                "16",
            ]
        )
        == 0
    )
    with History(scanned) as h:
        run = h.run()
        assert run.group_names() == ["mine"] and run.steps.tolist() == [75]
    capsys.readouterr()
    assert (
        main(["scan", str(tmp_path / "nowhere"), "--probes", str(ids_only), "--history", str(scanned)]) == 2
    )
    assert "no such checkpoint or directory" in capsys.readouterr().err
    assert (
        main(
            [
                "scan",
                str(trained_with_checkpoints),
                "--probes",
                str(tmp_path / "none.jsonl"),
                "--history",
                str(scanned),
            ]
        )
        == 2
    )
    assert "no probe file at" in capsys.readouterr().err


def test_scan_samples_windows_from_a_dataset_file_and_scores_canaries(tmp_path, trained_with_checkpoints):
    from memwatch.canaries import make_canaries

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": list(range(i, i + 50))}) for i in range(30)))
    man = make_canaries(ByteTokenizer(), tiers=(2,), per_tier=1, prefix_len=K, secret_len=M, references=8)
    mpath = man.save(tmp_path / "canaries.json")
    history = tmp_path / "h.sqlite"
    assert (
        main(
            [
                "scan",
                str(trained_with_checkpoints / "checkpoint-75"),
                "--sample-from",
                str(data),
                "--samples",
                "5",
                "--history",
                str(history),
                "--prefix-len",
                str(K),
                "--suffix-len",
                str(M),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "scan",
                str(trained_with_checkpoints / "checkpoint-75"),
                "--probes",
                str(mpath),
                "--history",
                str(tmp_path / "c.sqlite"),
                "--prefix-len",
                str(K),
                "--suffix-len",
                str(M),
                "--exposure-references",
                "8",
            ]
        )
        == 0
    )
    with History(history) as h:
        run = h.run()
        assert run.group_names() == ["train"] and len(run.ids) == 5
        assert all(m["start"] == 0 for m in run.metas)
    with History(tmp_path / "c.sqlite") as h:
        run = h.run()
        assert run.group_names() == ["canary", "canary_heldout"]
        assert np.isfinite(run.exposure).all()  # exposure is scored in scans too


def test_a_full_size_canary_manifest_is_recognized(tmp_path):
    from memwatch.canaries import make_canaries

    man = make_canaries(ByteTokenizer(), prefix_len=16, secret_len=8, references=200)  # the default tiers
    path = man.save(tmp_path / "canaries.json")
    assert os.path.getsize(path) > 16_384  # "references" lies far past the first few KiB of the file
    items, loaded = load_probes(str(path))
    assert items == [] and loaded is not None and len(loaded.canaries) == 16


@pytest.mark.monitor_failures
def test_a_checkpoint_that_fails_fails_the_scan(tmp_path, trained_with_checkpoints, monkeypatch, capsys):
    import memwatch.engine.extraction

    def broken(*args, **kwargs):
        raise RuntimeError("cannot evaluate")

    probes = tmp_path / "ids.jsonl"
    probes.write_text(json.dumps({"input_ids": list(range(40))}) + "\n")
    monkeypatch.setattr(memwatch.engine.extraction, "extract", broken)
    code = main(
        [
            "scan",
            str(trained_with_checkpoints / "checkpoint-75"),
            "--probes",
            str(probes),
            "--history",
            str(tmp_path / "s.sqlite"),
            "--prefix-len",
            "16",
            "--suffix-len",
            "16",
        ]
    )
    assert (
        code == 2
        and "checkpoint-75 (step 75) failed: RuntimeError: cannot evaluate" in capsys.readouterr().err
    )


def test_the_command_line_gives_command_line_advice(tmp_path, trained_with_checkpoints, capsys):
    """Errors reaching the CLI name its flags, not MonitorConfig fields; a canary manifest's own lengths are the
    scan's default, so the common case needs no flag at all."""
    from memwatch.canaries import make_canaries

    man = make_canaries(ByteTokenizer(), tiers=(2,), per_tier=1, prefix_len=K, secret_len=M, references=8)
    mpath = str(man.save(tmp_path / "canaries.json"))
    ckpt = str(trained_with_checkpoints / "checkpoint-75")
    base = ["scan", ckpt, "--probes", mpath, "--exposure-references", "8"]
    assert K != 32 and M != 32  # the defaults would not fit: the manifest's lengths are what made this work
    assert main([*base, "--history", str(tmp_path / "ok.sqlite")]) == 0
    with History(tmp_path / "ok.sqlite") as h:
        evals = h.store.evals(h.run().run_id)
        assert (evals[-1]["prefix_len"], evals[-1]["suffix_len"]) == (K, M)
    capsys.readouterr()
    assert main([*base, "--suffix-len", str(M + 2), "--history", str(tmp_path / "bad.sqlite")]) == 2
    err = capsys.readouterr().err
    assert f"pass --suffix-len {M}" in err and "MonitorConfig" not in err
    # A read-only place for the history, as an ordinary user meets it (root drops CAP_DAC_OVERRIDE to see it).
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    command = [sys.executable, "-m", "memwatch.cli", *base, "--history", str(locked / "sub" / "h.sqlite")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        run = subprocess.run(command, capture_output=True, text=True)
    finally:
        locked.chmod(0o755)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "cannot create the history" in run.stderr and "(--history FILE)" in run.stderr
    assert "MonitorConfig" not in run.stderr and "history_path" not in run.stderr
