"""Notebooks: a short repr and the report's own HTML, the run's tables as DataFrames, the figures read back."""

from __future__ import annotations

import math
import re
import sys

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display in tests

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _readme import run_snippet
from test_html_report import ALERT, STEPS, TIERS, Page, build_canary_history
from test_report import SPEC, build_known_history

from memwatch.notebook import plot_dose_response, plot_entropy_profile, plot_rates, plot_transitions
from memwatch.posthoc.report import render_html
from memwatch.reporters.plot import BUCKET_COLORS
from memwatch.signals.buckets import BUCKET_NAMES
from memwatch.store.history import HistoryStore
from memwatch.store.runs import History, RunData, report_dict

EXTRA = re.escape("pip install 'memwatch[notebook]'")


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    """The HTML report tests' history: train, heldout and three canary tiers over 9 evaluations, one alert."""
    path = tmp_path_factory.mktemp("canary") / "h.sqlite"
    build_canary_history(path)
    return path


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """The JSON report tests' history: 4 probes over steps 0, 10, 20, every value known."""
    path = tmp_path_factory.mktemp("known") / "h.sqlite"
    build_known_history(path)
    return path


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


GROUPS = [
    "train",
    "heldout",
    "canary",
    "canary_heldout",
    *[f"a-custom-group-with-a-long-name-{j}" for j in range(4)],
]
LONG = "a-run-name-much-longer-than-anyone-reads-" * 4


def build_wide_history(path, runs: int = 4, probes: int = 130) -> None:
    """`runs` runs of a 130-probe panel in 8 groups (long ids, long metadata, a long run name), 3 evaluations."""
    h = HistoryStore(path)
    ids = [f"probe-with-a-long-identifier-{i:05d}-" + "x" * 40 for i in range(probes)]
    for k in range(runs):
        run = h.add_run(f"{LONG}{k}", config={"memorized_threshold": 1.0, "boundary_width": 1})
        h.add_probes(
            run,
            [
                (pid, [i % 50] * 8, GROUPS[i % 8], {"source_index": i, "text": "y" * 200})
                for i, pid in enumerate(ids)
            ],
        )
        for step in (0, 10, 20):
            r = np.full(probes, step / 20, dtype=np.float32)
            h.add_evaluation(
                run,
                step,
                spec=SPEC,
                probe_ids=ids,
                columns={
                    "exact": r == 1.0,
                    "match_ratio": r,
                    "prefix_match_len": np.round(r * 4).astype(int),
                    "edit_similarity": r,
                    "suffix_nll": 1 - r,
                    "near_tie": np.zeros(probes, bool),
                    "generated": np.zeros((probes, 4), np.int32),
                    "entropy": np.ones((probes, 6), np.float32),
                },
            )
        h.set_run_status(run, "finished", last_step=20)
    h.close()


def test_repr_is_a_few_lines_whatever_the_panel(tmp_path):
    path = tmp_path / "wide.sqlite"
    build_wide_history(path)
    with History(path) as h:
        run = h.run()
        text = repr(run)
        assert len(text) < 500 and "\n" not in text, (len(text), text)
        assert text.startswith(f"RunData(run 4 '{LONG[:20]}") and "…" in text  # the long name clipped
        assert "finished" in text and "3 evaluations at steps 0..20" in text and "130 probes" in text
        # Per group its number of probes, the first five groups (GROUP_ORDER), clipped, then how many more.
        assert (
            "(canary 16, canary_heldout 16, train 17, heldout 17, a-custom-…ong-name-0 16, +3 more groups)"
            in text
        )
        assert str(path) in text
        assert len(run.ids) == 130 and len(run.tokens) == 130  # the data is there, just not printed
        text = repr(h)
        assert len(text) < 500 and len(text.splitlines()) == 5, (len(text), text)
        assert text.startswith(f"History({str(path)!r}, 4 runs:") and "(and 1 earlier run)" in text
        assert [int(x) for x in re.findall(r"^  run (\d+) ", text, re.M)] == [2, 3, 4]
        assert text.count("finished, 3 evaluations at steps 0..20, 130 probes") == 3
    assert "unreadable" in repr(h) and len(repr(h)) < 500  # closed: still a repr, never an exception


def _bare(page: str) -> str:
    return page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_repr_html_is_the_reports_own_section_of_the_run(canary):
    with History(canary) as h:
        run = h.run()
        fragment, whole, full = run._repr_html_(), h._repr_html_(), render_html(h)
        data = report_dict(h)
    for page in (fragment, whole):
        # A fragment for a notebook's page: no document, no scripts, nothing fetched, its CSS limited to itself.
        assert page.startswith('<div class="memwatch-report"><style>') and page.endswith("</div>")
        assert not re.search(r"<(!doctype|html|head|body|script)\b", page, re.I)
        assert "http" not in _bare(page) and "url(" not in page
        style = re.search(r"<style>(.*?)</style>", page).group(1)
        selectors = [s for rule in re.findall(r"([^{}]+)\{", style) for s in rule.split(",")]
        assert selectors and all(s.startswith(".memwatch-report ") for s in selectors), selectors
    # The report's run section, the very same markup: what `memwatch report --format html` shows for the run.
    section = fragment[fragment.index("</style>") + len("</style>") : -len("</div>")]
    assert section.startswith("<h2>Run 1: canaries") and section in full and section in whole
    assert f"<p>memwatch history {canary}</p>" in whole
    page, report = Page(fragment), Page(full)
    assert page.tables.keys() == report.tables.keys() and page.charts.keys() == report.charts.keys()
    assert {"extraction rate by group", "canary exposure by tier (bits)"} <= set(page.charts)
    # The numbers shown are the report's: the groups table against the JSON report's evaluations.
    table = page.tables["Groups over steps"]
    heads = [c["text"] for c in table["headers"]]
    rows = [dict(zip(heads, (c["text"] for c in r), strict=True)) for r in table["rows"][1:]]
    evals = data["evals"]
    assert len(rows) == len(evals) == len(STEPS) * 4
    for shown, e in zip(rows, evals, strict=True):
        assert (shown["step"], shown["group"]) == (str(e["step"]), e["group"])
        assert (int(shown["n"]), int(shown["extracted"])) == (e["n"], e["extracted"])
        assert float(shown["extraction rate"].rstrip("%")) / 100 == pytest.approx(
            e["extraction_rate"], abs=5e-4
        )
    # A transition table per group: the run's transitions_frame, cell by cell.
    with History(canary) as h:
        run = h.run()
        for group in ("train", "canary"):
            t = page.tables[f"{group}: transitions, step 0 → {STEPS[-1]}"]
            cells = [[c["text"] for c in r] for r in t["rows"][1:]]
            assert [r[0] for r in cells] == list(BUCKET_NAMES)
            shown = np.array([[int(x) for x in r[1:]] for r in cells])
            assert (shown == run.transitions_frame(group=group).to_numpy()).all()
    assert [c["text"] for c in page.tables["Alerts"]["rows"][1]][-1] == ALERT  # the run's alerts came along


def test_frames_hold_the_runs_own_lists(canary):
    with History(canary) as h:
        run = h.run()
        series, frame = run.group_series(), run.series_frame()
        tiers, tiers_frame = run.tiers(), run.tiers_frame()
        timelines, timelines_frame = run.timelines(), run.timelines_frame()
        probes = h.to_pandas()  # the history's long per-probe table still works
    assert len(probes) == len(STEPS) * len(run.ids)

    def same(frame_value, listed) -> bool:
        if listed is None:
            return frame_value is pd.NA or (isinstance(frame_value, float) and math.isnan(frame_value))
        return frame_value == listed

    # One row per (step, group), every statistic as listed; the buckets as buckets/<bucket> columns.
    assert len(frame) == len(series) and list(frame.columns[:5]) == [
        "step",
        "group",
        "n",
        "extracted",
        "memorized",
    ]
    for (_, row), listed in zip(frame.iterrows(), series, strict=True):
        for key, value in listed.items():
            if key == "buckets":
                assert all(row[f"buckets/{b}"] == n for b, n in value.items())
            elif key not in ("boundary", "ngram_profile"):
                assert same(row[key], value), (key, row[key], value)
    assert {frame[c].dtype for c in ("step", "n", "extracted", "memorized", "buckets/exact")} == {
        np.dtype("int64")
    }
    assert frame["extraction_rate"].dtype == np.float64 and pd.api.types.is_string_dtype(frame["group"])
    assert (
        frame["median_lid"].isna().all()
    )  # a statistic this run never measured: a NaN column, not a missing one
    # The dose-response: one row per (step, tier).
    assert len(tiers_frame) == len(tiers) == len(STEPS) * len(TIERS)
    for (_, row), listed in zip(tiers_frame.iterrows(), tiers, strict=True):
        assert all(same(row[k], v) for k, v in listed.items())
    assert tiers_frame["repetitions"].dtype == np.int64 and tiers_frame["median_exposure"].dtype == np.float64
    assert tiers_frame["first_memorized_step"].dtype == "Int64"
    assert tiers_frame["first_memorized_step"].isna().sum() == sum(
        r["first_memorized_step"] is None for r in tiers
    )
    # Per probe its timeline, in panel order; lists stay lists.
    assert timelines_frame["id"].tolist() == run.ids
    for (_, row), listed in zip(timelines_frame.iterrows(), timelines, strict=True):
        assert all(same(row[k], v) for k, v in listed.items())
    assert (
        timelines_frame["first_memorized_step"].dtype == "Int64"
        and timelines_frame["memorized_at_end"].dtype == bool
    )
    assert (
        timelines_frame["repetitions"].dtype == "Int64" and timelines_frame["repetitions"].isna().sum() == 8
    )
    # The transition matrix: square, the buckets both ways, every group summed unless one is named.
    t = run.transitions_frame()
    assert list(t.index) == list(t.columns) == list(BUCKET_NAMES) and (t.dtypes == np.int64).all()
    assert t.attrs == {"from_step": 0, "to_step": STEPS[-1], "group": None}
    want = sum(np.array(x["matrix"]) for x in run.transitions(0, len(STEPS) - 1))
    assert (t.to_numpy() == want).all() and t.to_numpy().sum() == len(run.ids)
    t = run.transitions_frame(from_step=200, to_step=-2, group="canary")
    assert t.attrs == {"from_step": 200, "to_step": STEPS[-2], "group": "canary"}
    (listed,) = [x for x in run.transitions(2, len(STEPS) - 2) if x["group"] == "canary"]
    assert (t.to_numpy() == np.array(listed["matrix"])).all()
    with pytest.raises(ValueError, match=r"no evaluation at step 150; steps: \[0, 100"):
        run.transitions_frame(from_step=150)
    with pytest.raises(ValueError, match="no group 'nope'"):
        run.transitions_frame(group="nope")


def test_transitions_frame_on_known_values(known):
    """train a: exact at 10 -> 0.5 at 20; train b: 0.75 -> exact (tests/test_report.py's history)."""
    with History(known) as h:
        t = h.run().transitions_frame(10, 20, group="train")
    assert t.loc["exact", "40-60"] == 1 and t.loc["60-80", "exact"] == 1 and t.to_numpy().sum() == 2


def test_plots_draw_the_runs_numbers(canary):
    with History(canary) as h:
        run = h.run()
    series = run.series_frame()
    # Rates over steps: a line per group, through every evaluation, at the group's rate; the axis in percent.
    ax = plot_rates(run)
    assert [line.get_label() for line in ax.get_lines()] == run.group_names()
    for line in ax.get_lines():
        rows = series[series["group"] == line.get_label()]
        assert line.get_xdata().tolist() == STEPS
        assert np.allclose(line.get_ydata(), rows["extraction_rate"])
    assert ax.yaxis.get_major_formatter().__class__.__name__ == "PercentFormatter"
    _fig, axes = plt.subplots(2, 2)
    assert plot_rates(run, axes[0, 0], stat="median_exposure") is axes[0, 0]  # drawn where asked
    canary_line = axes[0, 0].get_lines()[0]
    assert np.allclose(canary_line.get_ydata(), series[series["group"] == "canary"]["median_exposure"])
    # Dose-response: the tiers on x, inserted solid and twins dashed in one colour, at the step asked for.
    tiers = run.tiers_frame()
    for stat, step in (("extraction_rate", -1), ("median_exposure", 400)):
        ax = plot_dose_response(run, stat=stat, step=step)
        inserted, twins = ax.get_lines()
        at = tiers[tiers["step"] == (STEPS[-1] if step == -1 else step)]
        assert inserted.get_xdata().tolist() == list(TIERS) == twins.get_xdata().tolist()
        assert np.allclose(inserted.get_ydata(), at[stat]) and np.allclose(
            twins.get_ydata(), at[f"twins_{stat}"]
        )
        assert twins.get_linestyle() == "--" and twins.get_color() == inserted.get_color()
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"{r}x" for r in TIERS]
    # Entropy profile: a line per bucket at the boundary-relative positions, its colour, and the boundary line.
    profiles = run.entropy_profiles(4)
    ax = plot_entropy_profile(run, step=400, group="train")
    *lines, boundary = ax.get_lines()
    assert list(boundary.get_xdata()) == [-0.5, -0.5] and boundary.get_linestyle() == "--"
    assert [line.get_label().split(" ")[0] for line in lines] == list(profiles["train"])
    for line, (bucket, entry) in zip(lines, profiles["train"].items(), strict=True):
        assert line.get_xdata().tolist() == list(
            range(-run.entropy_window, len(entry["profile"]) - run.entropy_window)
        )
        assert np.allclose(line.get_ydata(), entry["profile"])
        assert np.allclose(matplotlib.colors.to_rgb(line.get_color()), np.array(BUCKET_COLORS[bucket]) / 255)
    assert "step 400" in ax.get_title() and plot_entropy_profile(run).get_title().endswith(
        f"step {STEPS[-1]}"
    )
    # Transitions: the heat map's image is the transitions frame, its counts written in the non-empty cells.
    for group in (None, "canary"):
        frame = run.transitions_frame(100, -1, group=group)
        ax = plot_transitions(run, 100, None, group=group)
        assert (np.asarray(ax.images[0].get_array()) == frame.to_numpy()).all()
        written = sorted(int(t.get_text()) for t in ax.texts)
        assert written == sorted(int(n) for n in frame.to_numpy().ravel() if n)
        assert [t.get_text() for t in ax.get_xticklabels()] == list(BUCKET_NAMES)
        assert ax.get_ylabel() == "bucket at step 100" and ax.get_xlabel() == f"bucket at step {STEPS[-1]}"
    with pytest.raises(ValueError, match="no measured statistic 'nope'"):
        plot_rates(run, stat="nope")
    with pytest.raises(ValueError, match="no entropy profile of group 'nope'"):
        plot_entropy_profile(run, group="nope")


def test_a_run_without_canaries_says_so(known):
    with History(known) as h:
        run = h.run()
    assert run.tiers_frame().empty
    with pytest.raises(ValueError, match="no canary tiers"):
        plot_dose_response(run)


def test_missing_extras_name_the_notebook_extra(known, monkeypatch):
    with History(known) as h:
        run = h.run()
        run.replayed()  # the records, built while pandas is there (scikit-learn looks for it)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if it were not installed
    for frame in (run.series_frame, run.tiers_frame, run.timelines_frame, run.transitions_frame):
        with pytest.raises(ImportError, match=EXTRA):
            frame()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    for plot in (plot_rates, plot_dose_response, plot_entropy_profile, plot_transitions):
        with pytest.raises(ImportError, match=f"memwatch.notebook needs matplotlib: {EXTRA}"):
            plot(run)  # said first, before any check of the run (which has no canaries)


def test_readme_notebook_snippet(canary, capsys):
    ns = run_snippet("notebook", path=str(canary))
    run = ns["run"]
    assert isinstance(run, RunData) and capsys.readouterr().out.strip() == repr(run)
    rates = ns["rates"]  # steps down, groups across
    assert rates.index.tolist() == STEPS and set(rates.columns) == set(run.group_names())
    assert rates.loc[STEPS[-1], "train"] == pytest.approx(0.5) and rates.loc[0, "train"] == 0
    assert ns["ever"]["id"].tolist() == [
        p["id"] for p in run.timelines() if p["first_memorized_step"] is not None
    ]
    assert [line.get_label() for line in ns["ax"].get_lines()] == run.group_names()
    assert len(plt.get_fignums()) == 4  # one figure per plot
    ns["history"].close()
