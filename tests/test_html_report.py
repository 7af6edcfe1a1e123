"""The HTML report's charts and tables, read back from the page: nice ticks, twins, extrapolation, alignment."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from _records import record_of

from memwatch.engine.result import ExtractionResult
from memwatch.live.sinks import write_history
from memwatch.posthoc.report import render_html, render_text
from memwatch.record import ProbeTracker
from memwatch.store.history import HistoryStore
from memwatch.store.runs import History

K, M, W = 4, 4, 2
STEPS = list(range(0, 801, 100))
TIERS = (1, 4, 16)
CEILING = 8.0  # log2 R with R = 256 references: the rank form's most
# Per tier, the steps at which its inserted canaries' median exposure is the extrapolated one (set below).
EXTRAPOLATED = {(16, st) for st in STEPS if st >= 500} | {(4, 800)}
ALERT = "canaries/16x: median exposure 11.0 bits is above 3.0 bits; the model memorized inserted canaries"


def _exposures(rep: int, step: int, inserted: bool) -> tuple[list[float], list[float]]:
    """(rank form, extrapolated form) of a tier's 3 canaries (or twins) at a step, in bits."""
    if not inserted:  # twins are never trained on: low exposure, growing a little with the tier's index
        base = 0.2 + 0.1 * TIERS.index(rep) + step / 4000
        return [base - 0.1, base, base + 0.3], [base - 0.2, base - 0.1, base + 0.2]
    if (rep, step) in EXTRAPOLATED:  # two of three beat every reference: the median is past the ceiling
        return [5.0, CEILING, CEILING], [4.0, CEILING + 1.5 + step / 400, CEILING + 4.0]
    ranked = [min(CEILING, 0.5 + rep * step / 3000 * f) for f in (0.5, 1.0, 1.5)]
    ranked[1] = min(ranked[1], CEILING - 0.5)  # the middle one stays under the ceiling: not extrapolated
    return ranked, [r - 0.3 for r in ranked]


def build_canary_history(path) -> None:
    """A real history written as the live monitor writes it (record building, write_history): train and heldout
    windows and three canary tiers of 3 inserted canaries and 3 twins, over 9 evaluations; the 16x tier's median
    exposure is extrapolated from step 500, the 4x tier's at step 800; one alert with a long message."""
    groups, metas = [], []
    for g in ("train", "heldout"):
        groups += [g] * 4
        metas += [{}] * 4
    for rep in TIERS:
        groups += ["canary"] * 3 + ["canary_heldout"] * 3
        metas += [{"repetitions": rep}] * 6
    n = len(groups)
    ids = [f"p{i}" for i in range(n)]
    h = HistoryStore(path)
    run = h.add_run("canaries", config={"memorized_threshold": 1.0, "boundary_width": 1})
    h.add_probes(
        run,
        [
            (pid, [i] * (K + M), g, meta)
            for i, (pid, g, meta) in enumerate(zip(ids, groups, metas, strict=True))
        ],
    )
    tracker = ProbeTracker(n)
    rng = np.random.default_rng(0)
    for step in STEPS:
        t = step / STEPS[-1]
        ratio = np.zeros(n, np.float32)
        ratio[:4] = [min(1.0, t * f) for f in (0.4, 0.8, 1.0, 1.3)]  # train: memorized with training
        ratio[4:8] = [0.0, 0.25, 0.25, 0.0]
        rank, extra = np.full(n, np.nan), np.full(n, np.nan)
        for j, rep in enumerate(TIERS):
            at = 8 + 6 * j
            ratio[at : at + 3] = np.round(np.minimum(1.0, t * rep / 8 * np.array([0.5, 0.75, 1.0])) * M) / M
            for inserted, rows in ((True, slice(at, at + 3)), (False, slice(at + 3, at + 6))):
                r, x = _exposures(rep, step, inserted)
                rank[rows], extra[rows] = r, x
        # The headline takes the extrapolation only where the secret beats every reference (signals.exposure).
        exposure = np.where(rank >= CEILING, np.maximum(rank, extra), rank)
        exact = ratio == 1.0
        entropy = rng.uniform(1.0, 3.0, (n, W + M)).astype(np.float32)
        entropy[exact, W:] = 0.3
        result = ExtractionResult(
            prefix_len=K,
            suffix_len=M,
            entropy_window=W,
            mode="full",
            generated=np.zeros((n, M), np.int64),
            exact=exact,
            match_ratio=ratio,
            match_count=np.round(ratio * M).astype(np.int64),
            prefix_match_len=np.round(ratio * M).astype(np.int64),
            edit_similarity=ratio,
            entropy=entropy,
            suffix_nll=(1 - ratio).astype(np.float32),
            near_tie=np.zeros(n, bool),
        )
        record = record_of(
            result,
            groups,
            step=step,
            tracker=tracker,
            metas=metas,
            extra={"exposure": exposure, "exposure_rank": rank, "exposure_extrapolated": extra},
            settings={"memorized_threshold": 1.0, "boundary_width": 1},
        )
        record.probe_ids = ids
        write_history(h, run, record, reveal_text=False)
    h.add_alert(run, 800, rule="exposure", message=ALERT, group="canaries/16x", action="stop")
    h.close()


class Page(HTMLParser):
    """The report's charts (per aria-label: tick labels with positions, polylines, markers) and tables (caption,
    headers, cells with their class)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.charts: dict[str, dict] = {}
        self.tables: dict[str, dict] = {}
        self.style = ""
        self._chart = self._last = self._table = self._text = None
        self._in: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._in.append(tag)
        if tag == "svg":
            self._chart = self.charts.setdefault(
                a["aria-label"], {"yt": [], "xt": [], "texts": [], "lines": [], "marks": [], "caption": ""}
            )
            self._last = self._chart
        elif tag == "text" and self._chart is not None:
            self._text = a
        elif tag == "polyline":
            pts = [tuple(map(float, p.split(","))) for p in a["points"].split()]
            self._chart["lines"].append(
                {"stroke": a["stroke"], "dash": a.get("stroke-dasharray"), "pts": pts}
            )
        elif tag == "circle" and a.get("class") == "x":
            self._chart["marks"].append({"cx": float(a["cx"]), "cy": float(a["cy"]), "stroke": a["stroke"]})
        elif tag == "table":
            self._table = {"headers": [], "rows": [], "class": (a.get("class") or "").split()}
        elif tag == "tr":
            self._table["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = {"class": a.get("class"), "text": ""}

    def handle_endtag(self, tag):
        self._in.pop()
        if tag == "svg":
            self._chart = None
        elif tag == "text":
            self._text = None
        elif tag == "th":
            self._table["headers"].append(self._cell)
        elif tag == "td":
            self._table["rows"][-1].append(self._cell)

    def handle_data(self, data):
        tag = self._in[-1] if self._in else None
        if tag == "style":
            self.style += data
        elif tag == "text" and self._text is not None and "class" in self._text:
            # Tick labels by their place: right-aligned left of the plot (y), numbers centred under it (x).
            anchor = self._text.get("text-anchor")
            number = re.fullmatch(r"-?[\d.]+%?", data) is not None
            kind = "yt" if anchor == "end" else "xt" if anchor == "middle" and number else None
            if kind:
                pos = float(self._text["y" if kind == "yt" else "x"])
                self._chart[kind].append((data, pos))
            else:
                self._chart["texts"].append(data)
        elif tag == "figcaption" and self._last is not None:
            self._last["caption"] += data
        elif tag == "title" and self._chart is not None and "polyline" in self._in:
            self._chart["lines"][-1]["name"] = data
        elif tag == "caption":
            self.tables[data] = self._table
        elif tag in ("td", "th"):
            self._cell["text"] += data


def _value(label: str) -> float:
    return float(label.rstrip("%")) / (100 if label.endswith("%") else 1)


def _is_nice_step(values: list[float]) -> float:
    """The ticks' common step, checked to be 1, 2 or 5 x 10^k with every tick a multiple of it."""
    steps = np.diff(values)
    assert len(values) >= 2 and np.allclose(steps, steps[0]), values
    step = float(steps[0])
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    assert any(math.isclose(mantissa, m) for m in (1, 2, 5)), (values, step)
    for v in values:
        assert math.isclose(v / step, round(v / step), abs_tol=1e-9), (v, step)
    return step


def _axis(chart: dict, kind: str) -> tuple[np.ndarray, np.ndarray]:
    labels, pos = zip(*chart[kind], strict=True)
    return np.array([_value(x) for x in labels]), np.array(pos)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "h.sqlite"
    build_canary_history(path)
    with History(path) as h:
        page, text = render_html(h), render_text(h, width=200)
        run = h.all_runs()[0]
        return Page(page), text, run.tiers(), run.group_series()


def test_ticks_are_nice_cover_the_data_and_sit_where_their_values_are(report):
    """Every chart: y ticks at a 1/2/5 step, evenly spaced, from at or below the data to at or above it; 4 to 8 x
    ticks at a 1/2/5 step, placed linearly (the steps charts: 0, 200, ..., 800)."""
    page, _text, tiers, series = report
    rates = [r["extraction_rate"] for r in series]
    exposures = [r[k] for r in tiers for k in ("median_exposure", "twins_median_exposure")]
    charts = {"extraction rate by group": rates, "canary exposure by tier (bits)": exposures}
    assert set(charts) <= set(page.charts) and len(page.charts) >= 4
    for title, chart in page.charts.items():
        y, ypos = _axis(chart, "yt")
        _is_nice_step(list(y))
        assert len(y) >= 3 and np.all(np.diff(ypos) < 0), title  # upwards, evenly spaced
        assert np.allclose(np.diff(ypos), np.diff(ypos)[0], atol=0.11)
        x, xpos = _axis(chart, "xt")
        assert 4 <= len(x) <= 8, (title, x)  # not only the first and last step
        _is_nice_step(list(x))
        assert np.allclose(np.diff(xpos) / np.diff(x), (xpos[1] - xpos[0]) / (x[1] - x[0]), atol=1e-3)
        if title in charts:
            data = charts[title]
            assert y[0] <= min(data) and y[-1] >= max(data), (title, y, min(data), max(data))
            assert y[-1] - _is_nice_step(list(y)) < max(data)  # no empty tick interval above the data
            assert list(x) == [0, 200, 400, 600, 800], (title, x)


def _to_value(chart: dict, py: float) -> float:
    y, ypos = _axis(chart, "yt")
    return float(np.interp(-py, -ypos, y))


def test_exposure_chart_has_a_dashed_twins_line_per_tier_in_the_tiers_colour(report):
    """Per tier a solid line and a dashed twins line of the same colour, each point read back through the y ticks
    equal to the history's median (twins') exposure."""
    page, _text, tiers, _series = report
    chart = page.charts["canary exposure by tier (bits)"]
    lines = {line.get("name"): line for line in chart["lines"]}
    assert set(lines) == {f"{r}x" for r in TIERS} | {f"{r}x twins" for r in TIERS}
    assert len({lines[f"{r}x"]["stroke"] for r in TIERS}) == len(TIERS)  # tiers told apart
    for rep in TIERS:
        inserted, twins = lines[f"{rep}x"], lines[f"{rep}x twins"]
        assert twins["dash"] and not inserted["dash"] and twins["stroke"] == inserted["stroke"]
        want = [r["twins_median_exposure"] for r in tiers if r["repetitions"] == rep]
        got = [_to_value(chart, py) for _px, py in twins["pts"]]
        assert len(want) == len(STEPS) and got == pytest.approx(want, abs=0.02)
        want = [r["median_exposure"] for r in tiers if r["repetitions"] == rep]
        assert [_to_value(chart, py) for _px, py in inserted["pts"]] == pytest.approx(want, abs=0.02)


def test_extrapolated_exposure_is_marked_on_its_point_and_explained(report):
    """A ring on exactly the (tier, step) points whose median is extrapolated, at the median's value."""
    page, _text, tiers, _series = report
    chart = page.charts["canary exposure by tier (bits)"]
    lines = {line.get("name"): line for line in chart["lines"]}
    x, xpos = _axis(chart, "xt")
    marked = set()
    for mark in chart["marks"]:
        step = round(float(np.interp(mark["cx"], xpos, x)))
        rep = next(r for r in TIERS if lines[f"{r}x"]["stroke"] == mark["stroke"])
        row = next(r for r in tiers if r["repetitions"] == rep and r["step"] == step)
        assert _to_value(chart, mark["cy"]) == pytest.approx(row["median_exposure"], abs=0.02)
        assert row["median_exposure"] > CEILING  # past what the rank form can say
        marked.add((rep, step))
    assert marked == EXTRAPOLATED
    # The legend and the caption say what the dashes and the rings are.
    assert {"twins (control)", "extrapolated"} <= set(chart["texts"])
    assert "dashed" in chart["caption"] and "extrapolated" in chart["caption"]


def _alignment(page: Page, caption: str) -> dict[str, str]:
    """Each column's text-align as the page's CSS gives it: right for every cell (th,td), left where a rule says so
    for the column by its place (a table's l<i> class with its nth-child(i) rule, or a first-child rule)."""
    table = page.tables[caption]
    assert re.search(r"(^|\})th,td\{[^}]*text-align:right", page.style)
    out = {}
    for i, head in enumerate(table["headers"], start=1):
        by_class = (
            f"l{i}" in table["class"] and f"table.l{i} tr>:nth-child({i}){{text-align:left}}" in page.style
        )
        first = i == 1 and re.search(r"td:first-child[^{]*\{text-align:left", page.style) is not None
        out[head["text"]] = "left" if by_class or first else "right"
    return out


def test_text_columns_left_and_number_columns_right(report):
    """The alerts' message, rule, group and action left; step right; statistics right, names left."""
    page, _text, _tiers, _series = report
    alerts = page.tables["Alerts"]
    assert [h["text"] for h in alerts["headers"]] == ["step", "rule", "group", "action", "message"]
    assert [c["text"] for c in alerts["rows"][1]] == ["800", "exposure", "canaries/16x", "stop", ALERT]
    assert _alignment(page, "Alerts") == {
        "step": "right",
        "rule": "left",
        "group": "left",
        "action": "left",
        "message": "left",
    }
    groups = _alignment(page, "Groups over steps")
    assert groups.pop("group") == "left" and set(groups.values()) == {"right"}  # every statistic is a number
    dose = _alignment(page, "Canaries: dose-response")
    assert set(dose.values()) == {"right"}  # 16x, 2/3, 11.5 bits, step 400: numbers with units
    timelines = _alignment(page, next(c for c in page.tables if c.startswith("Probe timelines")))
    assert timelines["probe"] == timelines["group"] == "left" and timelines["first memorized"] == "right"


def _text_table(text: str, title: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == title)
    block = []
    for line in lines[at + 1 :]:
        if not line.strip():
            if block:
                break
            continue
        if set(line.strip()) <= {"─", " "}:
            continue
        block.append(re.split(r"\s{2,}", line.strip()))
    return block[0], block[1:]


def test_dose_response_has_the_text_reports_columns_and_match_values(report):
    """The HTML dose-response table has the text report's columns (match included) and, at the last step, its
    very cells; the match column is each tier's mean match ratio."""
    page, text, tiers, _series = report
    table = page.tables["Canaries: dose-response"]
    headers = [h["text"] for h in table["headers"]]
    text_headers, text_rows = _text_table(text, f"canaries: dose-response at step {STEPS[-1]}")
    assert "match" in text_headers and headers == ["step", *text_headers]
    html_rows = [[c["text"] for c in r] for r in table["rows"][1:]]
    assert len(html_rows) == len(STEPS) * len(TIERS)
    last = [r[1:] for r in html_rows if r[0] == str(STEPS[-1])]
    assert last == text_rows  # every column, the match column included, reads as in the text report
    match = headers.index("match")
    for r, row in zip(tiers, html_rows, strict=True):
        assert row[0] == str(r["step"]) and row[match] == f"{r['mean_match_ratio']:.2f}"
    assert all(c["class"] is None for r in table["rows"][1:] for c in r[2:])


@pytest.mark.parametrize(
    ("lo", "hi", "integer", "cover", "want"),
    [
        (0, 3.27, False, True, [0, 1, 2, 3, 4]),
        (0, 0.034, False, True, [0, 0.01, 0.02, 0.03, 0.04]),
        (0, 0, False, True, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),  # all zero: still an axis
        (-0.4, 1.7, False, True, [-0.5, 0, 0.5, 1, 1.5, 2]),
        (0, 800, True, False, [0, 200, 400, 600, 800]),
        (-16, 31, True, False, [-10, 0, 10, 20, 30]),
        (-16, 15, True, False, [-15, -10, -5, 0, 5, 10, 15]),  # by 10 only three would fall inside
        (0, 2, True, False, [0, 1, 2]),  # training steps are whole
    ],
)
def test_nice_ticks(lo, hi, integer, cover, want):
    from memwatch.reporters.plot import nice_ticks, tick_label

    ticks = nice_ticks(lo, hi, 6 if integer else 5, integer=integer, cover=cover)
    assert ticks == pytest.approx(want)
    tenths = nice_ticks(0, 1, 5)
    assert [tick_label(v, tenths) for v in tenths] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert tick_label(0.4, [0.0, 0.2], percent=True) == "40%"


def test_tensorboard_profile_picture_has_grid_lines_at_nice_values():
    """The TensorBoard entropy pictures (reporters.plot) draw their y grid at the same 1/2/5 steps."""
    from memwatch.reporters.plot import _GRID, render_profiles

    height, top, bottom = 320, 28, 34
    img = render_profiles({"exact": [1.3, 1.1, 0.2, 0.1, 0.1]}, 2, height=height)
    rows = [y for y in range(height) if (img[y, 60:400] == _GRID).all(axis=-1).mean() > 0.5]
    ph = height - top - bottom
    values = sorted(round((top + ph - y) / ph * 1.5, 3) for y in rows)  # the axis tops out at 1.5
    assert values == pytest.approx([0.5, 1.0, 1.5], abs=0.01)  # the axis line itself covers 0
