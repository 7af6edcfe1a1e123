"""What README.md documents is what a run writes: the TensorBoard tag table against event files read back, both
ways (every documented tag is written by a run that exercises it; every written tag is documented)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_canary_trainer import K, M, canary_setup, make_trainer
from test_trainer import read_events

from memwatch import AlertConfig, MemWatchCallback, MonitorConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def documented_tags() -> dict[str, tuple[str, re.Pattern[str]]]:
    """README's tag table: tag -> (kind, a pattern matching the tags it stands for)."""
    block = README.split("<!-- tags:begin -->\n", 1)[1].split("\n<!-- tags:end -->", 1)[0]
    out = {}
    for line in block.splitlines()[2:]:
        tag, kind = (cell.strip() for cell in line.strip("|").split("|")[:2])
        tag = tag.strip("`")
        pattern = re.escape(tag)
        for placeholder in ("<group>", "<bucket>", "<r>", "<rule>"):
            pattern = pattern.replace(re.escape(placeholder), r"[^/]+")
        out[tag] = (kind, re.compile(pattern + "$"))
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Canaries of every tier (exposure every evaluation), training and held-out windows, alerts that fire, long
    enough for the 64x canaries to be extracted: every documented tag has something to say."""
    out = tmp_path_factory.mktemp("documented")
    data, manifest = canary_setup()
    held = [{"input_ids": r["input_ids"]} for r in data[-40:]]
    cfg = MonitorConfig(
        every_n_steps=100,
        prefix_len=K,
        suffix_len=M,
        train_probes=32,
        heldout_probes=16,
        exposure_references=32,
        console=False,
        alerts=AlertConfig(exposure_bits=3.0, extraction_rate={"canary": 0.2}),
    )
    cb = MemWatchCallback(cfg, canaries=manifest, heldout=held)
    make_trainer(out, data, [cb], steps=400).train()
    assert cb.monitor.evaluated_steps == [0, 100, 200, 300, 400]
    assert cb.monitor.alerts, "alerts fired, so the alerts text is written"
    return out, cb


def _written(out) -> dict[str, str]:
    acc = read_events(str(out / "memwatch" / "tb"))
    tags = acc.Tags()
    written = {t: "scalar" for t in tags["scalars"]}
    written |= {t: "histogram" for t in tags["histograms"]}
    written |= {t: "image" for t in tags["images"]}
    for t in tags["tensors"]:  # the text plugin stores "<tag>/text_summary"; custom scalars their layout
        if t.endswith("/text_summary"):
            written[t.removesuffix("/text_summary")] = "text"
    return {t: k for t, k in written.items() if t.startswith("memwatch/")}


@pytest.mark.slow
def test_every_documented_tag_is_written_and_every_written_tag_is_documented(full_run):
    out, _cb = full_run
    documented = documented_tags()
    written = _written(out)
    assert written, "the run wrote memwatch tags"
    undocumented = sorted(
        t for t, kind in written.items() if not any(p.match(t) and k == kind for k, p in documented.values())
    )
    assert not undocumented, f"written but not in README's table: {undocumented}"
    never_written = sorted(
        tag
        for tag, (kind, p) in documented.items()
        if not any(p.match(t) and k == kind for t, k in written.items())
    )
    assert not never_written, f"documented but never written: {never_written}"
