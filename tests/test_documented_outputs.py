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


def _pattern(text: str) -> re.Pattern[str]:
    pattern = re.escape(text)
    for placeholder in (
        "<group>",
        "<bucket>",
        "<r>",
        "<member>",
        "<control>",
        "<signal>",
        "<kind>",
        "<bin>",
        "<k>",
        "<m>",
    ):
        pattern = pattern.replace(re.escape(placeholder), r"[^/]+")
    return re.compile(pattern + "$")


def documented_tags() -> list[tuple[re.Pattern[str], re.Pattern[str], str]]:
    """README's tag table: (run pattern, tag pattern, kind) per row."""
    block = README.split("<!-- tags:begin -->\n", 1)[1].split("\n<!-- tags:end -->", 1)[0]
    out = []
    for line in block.splitlines()[2:]:
        run, tag, kind = (cell.strip().strip("`") for cell in line.strip("|").split("|")[:3])
        out.append((re.compile(r"$") if run == "(the log dir)" else _pattern(run), _pattern(tag), kind))
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Canaries of every tier (exposure every evaluation), training and held-out windows, alerts that fire, long
    enough for the 64x canaries to be extracted: every documented tag has something to say. And the same in mode
    "exact", whose numbers have names of their own. Returns the two output directories."""
    outs = []
    for mode, steps in (("full", 400), ("exact", 100)):
        out = tmp_path_factory.mktemp(f"documented-{mode}")
        data, manifest = canary_setup()
        held = [{"input_ids": r["input_ids"]} for r in data[-40:]]
        cfg = MonitorConfig(
            every_n_steps=100,
            prefix_len=K,
            suffix_len=M,
            mode=mode,
            train_probes=32,
            heldout_probes=16,
            exposure_references=32,
            console=False,
            signals={
                "lid": True
            },  # off by default (an optional package): on here, so its tags are written too
            ngrams="stream",  # the n-gram index's tags too, from the batches the Trainer trains on
            sweep_prefix_lens=(
                K // 2,
                K,
            ),  # and the live sweep's (one teacher-forced pass more per evaluation)
            alerts=AlertConfig(exposure_bits=3.0, extraction_rate={"canary": 0.2}),
        )
        cb = MemWatchCallback(cfg, canaries=manifest, heldout=held)
        make_trainer(out, data, [cb], steps=steps).train()
        assert cb.monitor.evaluated_steps == list(range(0, steps + 1, 100))
        assert cb.monitor.alerts, "alerts fired, so the alerts text is written"
        outs.append(out)
    return outs


def _written(out) -> set[tuple[str, str, str]]:
    """Every (run, tag, kind) in the event files: the log dir itself is run "", each sub-run its directory."""
    tb = out / "memwatch" / "tb"
    written = set()
    runs = ["", *sorted(d.name for d in tb.iterdir() if d.is_dir())]
    for run in runs:
        acc = read_events(str(tb / run))
        tags = acc.Tags()
        kinds = {"scalars": "scalar", "histograms": "histogram", "images": "image"}
        for key, kind in kinds.items():
            written |= {(run, t, kind) for t in tags[key]}
        for t in tags["tensors"]:  # the text plugin stores "<tag>/text_summary"; custom scalars their layout
            if t.endswith("/text_summary"):
                written.add((run, t.removesuffix("/text_summary"), "text"))
    return {w for w in written if w[1].startswith("memwatch/")}


@pytest.mark.slow
def test_every_documented_tag_is_written_and_every_written_tag_is_documented(full_run):
    documented = documented_tags()
    written = set().union(*(_written(out) for out in full_run))
    assert written, "the run wrote memwatch tags"
    undocumented = sorted(
        w for w in written if not any(r.match(w[0]) and t.match(w[1]) and k == w[2] for r, t, k in documented)
    )
    assert not undocumented, f"written but not in README's table: {undocumented}"
    never_written = sorted(
        (r.pattern, t.pattern, k)
        for r, t, k in documented
        if not any(r.match(w[0]) and t.match(w[1]) and k == w[2] for w in written)
    )
    # A TPR at a low FPR is refused below 100 (1%) or 1000 (0.1%) controls and then never written: this run's
    # panels are smaller (tests/test_membership.py writes the 1% one with 128 controls). Nothing else may be absent.
    refused = [t for t in never_written if re.search(r"_tpr_(1|0\\\.1)pct(_lo|_hi)?\$$", t[1])]
    # The reference model's signals need a reference (a PEFT base, or one named by path): this full fine-tune has
    # none; tests/test_reference.py reads them back from the event files of a run with one.
    calibrated = [t for t in never_written if re.search(r"(calibrated|reference_extraction_rate)\$$", t[1])]
    assert sorted(refused + calibrated) == never_written, (
        f"documented but never written: {sorted(set(never_written) - set(refused) - set(calibrated))}"
    )


@pytest.mark.slow
def test_every_custom_scalars_chart_draws_lines_and_each_tier_meets_its_twins(full_run):
    """The custom-scalars layout read back from the event file: every chart's patterns match tags a run wrote (no
    empty chart), each bucket chart has one line per group (not 24 on one), and a tier's canaries and its twins
    are on one chart."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    out = full_run[0]
    acc = read_events(str(out / "memwatch" / "tb"))
    (key,) = [t for t in acc.Tags()["tensors"] if "custom_scalars" in t]
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(key)[0].tensor_proto.string_val[0])
    written = _written(out)
    for category in layout.category:
        for chart in category.chart:
            lines = {
                (run, tag)
                for run, tag, kind in written
                if kind == "scalar" and any(re.search(p, tag) for p in chart.multiline.tag)
            }
            assert lines, f"chart {chart.title!r} in {category.title!r} draws nothing"
            if chart.title.startswith("probes in bucket"):
                assert {run for run, _ in lines} == {"canary", "canary_heldout", "train", "heldout"}
                assert len({tag for _, tag in lines}) == 1, chart.title
            if "canaries and their twins" in chart.title:
                tags = {tag for _, tag in lines}
                assert any("twins_" in t for t in tags) and any("twins_" not in t for t in tags), chart.title
    titles = [chart.title for category in layout.category for chart in category.chart]
    assert sum(t.startswith("probes in bucket") for t in titles) == 6
    assert sum("canaries and their twins" in t for t in titles) == 2
