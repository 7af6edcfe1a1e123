"""History reports people want to read: rich text, CSV, Pythia-style CSV and one self-contained HTML file."""

from __future__ import annotations

import csv
import html
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memwatch.reporters.plot import BUCKET_COLORS, nice_ticks, tick_label
from memwatch.signals import REGISTRY
from memwatch.signals.buckets import BUCKET_NAMES
from memwatch.store.runs import History, RunData, probe_rows

__all__ = ["compare_dict", "render_compare", "render_csv", "render_html", "render_text", "write_pythia_csv"]

_SPARK = "▁▂▃▄▅▆▇█"


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def group_table(run: RunData) -> tuple[list[str], list[list[str]]]:
    """The groups-over-steps table of the text and HTML reports alike: step, group, n, extracted, then every
    headline statistic of the registry that this run has (memwatch.signals: Aggregate.headline)."""
    series = run.group_series()
    stats = [a for a in REGISTRY.headline(run.mode) if any(a.stat in r for r in series)]
    headers = ["step", "group", "n", "extracted", *[a.title for a in stats]]
    rows = [
        [
            str(r["step"]),
            r["group"],
            str(r["n"]),
            str(r["extracted"]),
            *[_f(r.get(a.stat), a.fmt) for a in stats],
        ]
        for r in series
    ]
    return headers, rows


def contrast_table(run: RunData) -> tuple[list[str], list[list[str]]]:
    """Membership separation at the last evaluation: one row per pair (or canary tier) and membership signal,
    every headline contrast (AUC, ...) with its course over the steps, and the TPR at 1% / 0.1% FPR with its 95%
    Clopper-Pearson interval, or why it is refused. Empty when the run has no contrast."""
    series = run.contrasts()
    if not series:
        return [], []
    last = max(r["step"] for r in series)
    signals = [s.name for s in REGISTRY.signals.values() if s.membership]

    def split(key: str) -> tuple[str, str] | None:
        """(signal, statistic) of a contrast key, by the longest signal name it starts with (min_k_plus_auc)."""
        names = [s for s in signals if key.startswith(f"{s}_")]
        if not names:
            return None
        sig = max(names, key=len)
        return sig, key[len(sig) + 1 :]

    parsed = [split(key) for r in series for key in r]
    outputs = list(dict.fromkeys(p[1] for p in parsed if p is not None and not p[1].startswith("tpr_")))
    rows = []
    for r in (r for r in series if r["step"] == last):
        for sig in signals:
            values = [r.get(f"{sig}_{o}") for o in outputs]
            if all(v is None for v in values):
                continue
            course = (
                [x.get(f"{sig}_{outputs[0]}") for x in series if x["pair"] == r["pair"]] if outputs else []
            )
            row = [r["pair"], sig, *[_f(v, ".3f") for v in values]]
            row.append(spark([math.nan if v is None else v for v in course]))
            for label in ("1pct", "0.1pct"):
                key = f"{sig}_tpr_{label}"
                value = r.get(key)
                if value is None:
                    refused = any(
                        f"at {label.replace('pct', '%')} FPR" in note for note in r.get("notes", [])
                    )
                    row.append(f"refused: {r.get('control_n')} controls" if refused else "-")
                else:
                    row.append(
                        f"{value:.3f} [{_f(r.get(f'{key}_lo'), '.3f')}, {_f(r.get(f'{key}_hi'), '.3f')}]"
                    )
            rows.append(row)
    headers = [
        "pair",
        "signal",
        *outputs,
        f"{outputs[0] if outputs else ''} over steps",
        "TPR@1%FPR",
        "TPR@0.1%FPR",
    ]
    return headers, rows


def _pick(run: RunData, step: int | None, default: int) -> int:
    if step is None:
        return default
    hits = np.flatnonzero(run.steps == step)
    if not len(hits):
        raise ValueError(f"run {run.name!r} has no evaluation at step {step}; steps: {run.steps.tolist()}")
    return int(hits[0])


def spark(values: Sequence[float], boundary: int | None = None) -> str:
    """A unicode sparkline; a '|' marks the prefix/continuation boundary."""
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    if not len(finite):
        return ""
    lo, hi = float(finite.min()), float(finite.max())
    scale = (hi - lo) or 1.0
    chars = [_SPARK[round((x - lo) / scale * (len(_SPARK) - 1))] if math.isfinite(x) else " " for x in v]
    if boundary is not None and 0 < boundary < len(chars):
        chars.insert(boundary, "|")
    return "".join(chars)


# --- text -------------------------------------------------------------------------------------------------------


def _show(console: Any, table: Any) -> None:
    """Print a table at its natural width even past the console's: a report's numbers are never cut to '…'."""
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update_width(10_000), table).maximum
    width = console.width
    console.width = max(width, need)
    try:
        console.print(table)
    finally:
        console.width = width


def render_text(
    history: History,
    *,
    from_step: int | None = None,
    to_step: int | None = None,
    max_probes: int = 40,
    width: int = 120,
) -> str:
    """The readable report: per group over steps, a transition matrix, probe timelines, canaries, entropy, alerts."""
    from rich import box
    from rich.console import Console
    from rich.table import Table as _Table

    from memwatch.reporters.console import tier_table

    def Table(**kw: Any) -> _Table:
        return _Table(box=box.SIMPLE, **kw)

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    alerts = history.store.alerts()
    for run in history.all_runs():
        console.rule(f"run {run.run_id}: {run.name}")
        console.print(run.describe(), soft_wrap=True, highlight=False, markup=False)
        if not len(run.steps):
            console.print("no evaluations yet")
            continue
        t = Table(title="groups over steps", title_justify="left", header_style="bold")
        headers, rows = group_table(run)
        for col in headers:
            t.add_column(col, justify="left" if col == "group" else "right")
        for row in rows:
            t.add_row(*row)
        _show(console, t)
        headers, rows = contrast_table(run)
        if rows:
            t = Table(
                title=f"membership: members against their control at step {int(run.steps[-1])} (TPR with a 95% "
                "Clopper-Pearson interval; refused below 100 controls)",
                title_justify="left",
                header_style="bold",
            )
            for col in headers:
                t.add_column(col, justify="left" if col in ("pair", "signal") else "right")
            for row in rows:
                t.add_row(*row)
            _show(console, t)
        a = _pick(run, from_step, 0)
        b = _pick(run, to_step, len(run.steps) - 1)
        for tr in run.transitions(a, b):
            m = np.array(tr["matrix"])
            if not m.sum():
                continue
            t = Table(
                title=f"{tr['group']}: buckets at step {tr['from_step']} (rows) -> step {tr['to_step']} (columns)",
                title_justify="left",
                header_style="bold",
            )
            t.add_column("from \\ to")
            for name in BUCKET_NAMES:
                t.add_column(name, justify="right")
            for i, name in enumerate(BUCKET_NAMES):
                t.add_row(name, *[str(int(x)) if x else "." for x in m[i]])
            _show(console, t)
        timelines = [p for p in run.timelines() if p["first_memorized_step"] is not None]
        t = Table(
            title=f"probe timelines ({len(timelines)} ever memorized)",
            title_justify="left",
            header_style="bold",
        )
        for col in ("probe", "group", "tier", "first memorized", "forgotten at", "re-memorized at", "at end"):
            t.add_column(col)
        for p in timelines[:max_probes]:
            t.add_row(
                _probe_name(p),
                p["group"],
                f"{p['repetitions']}x" if "repetitions" in p else "",
                str(p["first_memorized_step"]),
                ", ".join(map(str, p["forgotten_steps"])) or "-",
                ", ".join(map(str, p["rememorized_steps"])) or "-",
                "yes" if p["memorized_at_end"] else "no",
            )
        _show(console, t)
        if len(timelines) > max_probes:
            console.print(f"... and {len(timelines) - max_probes} more (see --format json or csv)")
        tiers = [r for r in run.tiers() if r["step"] == int(run.steps[b])]
        if tiers:
            t = tier_table(tiers, f"canaries: dose-response at step {int(run.steps[b])}", box=box.SIMPLE)
            _show(console, t)
        t = Table(
            title=f"entropy across the boundary at step {int(run.steps[b])} (nats; '|' = boundary)",
            title_justify="left",
            header_style="bold",
        )
        for col in ("group", "bucket", "n", "before", "after", "jump", "profile"):
            t.add_column(col, justify="left" if col in ("group", "bucket", "profile") else "right")
        for g, per in run.entropy_profiles(b).items():
            for bucket, e in per.items():
                t.add_row(
                    g,
                    bucket,
                    str(e["n"]),
                    _f(e["pre"], ".2f"),
                    _f(e["post"], ".2f"),
                    _f(e["jump"], "+.2f"),
                    spark(e["profile"], run.entropy_window),
                )
        _show(console, t)
        run_alerts = [x for x in alerts if x["run_id"] == run.run_id]
        if run_alerts:
            t = Table(title="alerts", title_justify="left", header_style="bold")
            for col in ("step", "rule", "group", "action", "message"):
                t.add_column(col)
            for x in run_alerts:
                t.add_row(str(x["step"]), x["rule"], x["group"] or "", x["action"] or "", x["message"])
            _show(console, t)
    return out.getvalue()


# --- CSV ----------------------------------------------------------------------------------------------------------


def render_csv(history: History) -> str:
    """One row per (run, evaluation, probe): who and when, then every per-probe signal (analysis.probe_rows)."""
    rows = [row for run in history.all_runs() for row in probe_rows(run)]
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["run_id", "run", "step", "probe_id"]
    out = io.StringIO()
    w = csv.DictWriter(out, columns, lineterminator="\n", restval="")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def write_pythia_csv(history: History, out_dir: str) -> list[str]:
    """Pythia-style memorization scores: one `index,score` CSV per evaluation (checkpoint), over the training
    sequences (the `train` group).

    index: the probe's row in its source dataset when known (sampled windows), else its panel position; an example
    that gave several windows is scored once, by its first window (Pythia scores a sequence from its start).
    score: the match ratio (Biderman et al. 2023's memorization score), which needs mode "full".
    """
    runs = history.all_runs()
    exact_mode = [r.name for r in runs if any(spec.get("mode") == "exact" for spec in r.specs)]
    if exact_mode:
        raise ValueError(
            f"pythia-csv writes match ratios, which mode 'exact' does not measure (run {exact_mode[0]!r}); "
            "scan the checkpoints with --mode full for Pythia-style scores"
        )
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for run in runs:
        first: dict[int, int] = {}  # source index -> the panel row of its first window
        for i in np.flatnonzero(run.groups == "train").tolist():
            meta = run.metas[i]
            index = int(meta.get("source_index", i))
            j = first.get(index)
            if j is None or int(meta.get("start", 0)) < int(run.metas[j].get("start", 0)):
                first[index] = i
        for e, step in enumerate(run.steps.tolist()):
            path = os.path.join(out_dir, f"{_slug(run.name)}-step{step}.csv")
            with open(path, "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(["index", "score"])
                for index in sorted(first):
                    w.writerow([index, repr(float(run.match_ratio[e, first[index]]))])
            paths.append(path)
    return paths


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"


# --- HTML ---------------------------------------------------------------------------------------------------------

_COLORS = ["#3b6fb6", "#d9622b", "#3c9d5d", "#a23b72", "#8c6d1f", "#5b5b5b", "#1f8a8a", "#b8860b"]
# The same colour per bucket as the TensorBoard pictures (reporters.plot), as CSS.
_BUCKET_COLORS = {name: "#{:02x}{:02x}{:02x}".format(*rgb) for name, rgb in BUCKET_COLORS.items()}


@dataclass
class _Line:
    """One line of a chart: points (x, y; None or NaN for none), its colour, dashed or solid, and which points get
    the extrapolated marker (marked[i] for point i)."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str
    dashed: bool = False
    marked: Sequence[bool] = ()
    legend: bool = True


def _finite(y: Any) -> bool:
    return y is not None and math.isfinite(y)


def _svg_lines(
    lines: Sequence[_Line],
    title: str,
    x_label: str,
    *,
    vline: float | None = None,
    percent: bool = False,
    keys: Sequence[str] = (),
) -> str:
    """A small self-contained SVG line chart with y ticks covering the data at a 1/2/5 step and x ticks at one too.

    keys: extra legend entries below the lines' ("twins", "extrapolated"): how to read dashes and markers."""
    w, h, left, right, top, bottom = 560, 260, 52, 150, 28, 36
    xs_all = [x for line in lines for x, y in zip(line.xs, line.ys, strict=True) if _finite(y)]
    ys_all = [y for line in lines for y in line.ys if _finite(y)]
    if not xs_all:
        return f"<figure><figcaption>{html.escape(title)}: no data</figcaption></figure>"
    x0, x1 = min(xs_all), max(xs_all)
    # Rates, exposures and entropies read against zero: the y axis always holds it.
    yticks = nice_ticks(min(0.0, *ys_all), max(0.0, *ys_all), 5)
    y0, y1 = yticks[0], yticks[-1]
    # The x axis keeps the data's range (no empty steps before the first evaluation); ticks inside it.
    xticks = nice_ticks(x0, x1, 6, integer=True, cover=False)
    sx = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (w - left - right)  # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" class="t">{html.escape(title)}</text>',
    ]
    # Labels sit on their grid line (dominant-baseline), so a label's y is its value's y.
    for value in yticks:
        y = sy(value)
        parts.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>'
            f'<text x="{left - 6}" y="{y:.1f}" class="a yt" text-anchor="end" dominant-baseline="middle">'
            f"{tick_label(value, yticks, percent=percent)}</text>"
        )
    for value in xticks:
        x = sx(value)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{h - bottom}" y2="{h - bottom + 4}" class="k"/>'
            f'<text x="{x:.1f}" y="{h - bottom + 16}" class="a xt" text-anchor="middle">'
            f"{tick_label(value, xticks)}</text>"
        )
    parts.append(
        f'<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" class="k"/>'
        f'<text x="{(left + w - right) / 2}" y="{h - 4}" class="a" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    if vline is not None:
        parts.append(
            f'<line x1="{sx(vline):.1f}" x2="{sx(vline):.1f}" y1="{top}" y2="{h - bottom}" class="v"/>'
        )
    ly = top
    for line in lines:
        points = [(x, y) for x, y in zip(line.xs, line.ys, strict=True) if _finite(y)]
        name = html.escape(line.name)
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline fill="none" stroke="{line.color}" stroke-width="2"{dash} points="{pts}">'
            f"<title>{name}</title></polyline>"
        )
        if len(points) <= 25:  # few evaluations: a dot per point shows where the line was measured
            parts.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{line.color}"/>' for x, y in points
            )
        for x, y, marked in zip(line.xs, line.ys, line.marked, strict=False):
            if marked and _finite(y):
                parts.append(
                    f'<circle class="x" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="#fff" stroke="{line.color}" '
                    f'stroke-width="2"><title>{name} at {x:g}: {y:.1f} (extrapolated)</title></circle>'
                )
        if line.legend:
            parts.append(
                f'<line x1="{w - right + 10}" x2="{w - right + 32}" y1="{ly + 5}" y2="{ly + 5}" stroke="{line.color}" '
                f'stroke-width="3"{dash}/><text x="{w - right + 38}" y="{ly + 9}" class="a">{name}</text>'
            )
            ly += 14
    for key in keys:
        ly += 4
        if key == "twins":
            parts.append(
                f'<line x1="{w - right + 10}" x2="{w - right + 32}" y1="{ly + 5}" y2="{ly + 5}" class="kd"/>'
                f'<text x="{w - right + 38}" y="{ly + 9}" class="a">twins (control)</text>'
            )
        elif key == "extrapolated":
            parts.append(
                f'<circle cx="{w - right + 21}" cy="{ly + 5}" r="5" fill="#fff" stroke="#444" stroke-width="2"/>'
                f'<text x="{w - right + 38}" y="{ly + 9}" class="a">extrapolated</text>'
            )
        ly += 14
    parts.append("</svg>")
    return "<figure>" + "".join(parts) + "</figure>"


def _exposure_chart(run: RunData, tier_rows: Sequence[dict[str, Any]]) -> str:
    """Median exposure per tier over the steps, solid, against its never-inserted twins, dashed in the tier's colour
    (the control: what exposure looks like without training on the canary), and hollow markers where the tier's
    median is extrapolated: the canaries beat every reference, so the rank form stops at log2 R and the headline
    is the skew-normal tail (signals.exposure)."""
    steps = run.steps.tolist()
    by = {(r["step"], r["repetitions"]): r for r in tier_rows}
    reps = sorted({r["repetitions"] for r in tier_rows})
    lines = []
    for j, rep in enumerate(reps):
        rows = [by.get((st, rep), {}) for st in steps]
        color = _COLORS[j % len(_COLORS)]
        lines.append(
            _Line(
                f"{rep}x",
                steps,
                [r.get("median_exposure") for r in rows],
                color,
                marked=[_extrapolated(r) for r in rows],
            )
        )
        lines.append(
            _Line(
                f"{rep}x twins",
                steps,
                [r.get("twins_median_exposure") for r in rows],
                color,
                True,
                legend=False,
            )
        )
    keys = ["twins"] + (["extrapolated"] if any(any(line.marked) for line in lines) else [])
    chart = _svg_lines(lines, "canary exposure by tier (bits)", "step", keys=keys)
    note = "Solid: inserted canaries' median exposure; dashed, same colour: their never-inserted twins (the control)."
    if "extrapolated" in keys:
        note += (
            " Hollow circle: the median rests on extrapolated exposure (a canary beat every reference, past the "
            "rank form's log2 R ceiling; a skew-normal tail estimate, not a count)."
        )
    return chart.replace("</figure>", f'<figcaption class="n">{html.escape(note)}</figcaption></figure>')


def _extrapolated(row: dict[str, Any]) -> bool:
    """Whether a tier row's median exposure rests on the extrapolated form. Extrapolation only ever raises a
    canary already at the rank form's ceiling, so the order of the canaries is kept and the median exceeds the
    rank form's median exactly when the middle canary (or one of the two) is extrapolated. The twins have no rank
    median in the history (the aggregate is per tier only), so their line is never marked."""
    value, ranked = row.get("median_exposure"), row.get("median_exposure_rank")
    return _finite(value) and _finite(ranked) and value > ranked + 1e-9


# A cell reads as a number: digits with a sign, decimals, a unit (%, x, bits), a fraction (3/8), an interval
# ("0.41 [0.2, 0.6]"), a list ("10, 20") or "step 300"; "-" and refusals say nothing either way.
_NUMBER = re.compile(
    r"(step )?[-+]?\d[\d.,]*(e[-+]?\d+)?(%| ?bits|x)?(/\d+)?( \[[^\]]*\])?(, [-+]?\d[\d.]*)*"
)


def _numeric(cells: Sequence[Any]) -> bool:
    said = [str(c) for c in cells if str(c) not in ("", "-") and not str(c).startswith("refused")]
    return bool(said) and all(_NUMBER.fullmatch(c) for c in said)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str) -> str:
    """An HTML table: numeric columns right-aligned (digits line up), text columns left-aligned. The table names
    its text columns by class (l2: the 2nd), styled by _style, so the cells stay bare <td>s."""
    left = [i + 1 for i in range(len(headers)) if not _numeric([r[i] for r in rows])]
    cls = f' class="{" ".join(f"l{i}" for i in left)}"' if left else ""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return (
        f"<table{cls}><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


# The report's CSS, rule by rule (selector, declarations), so that a fragment can limit every rule to itself.
_CSS = (
    ("body", "font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px"),
    ("h1", "font-size:22px"),
    ("h2", "font-size:18px;margin-top:32px;border-bottom:1px solid #ddd"),
    ("table", "border-collapse:collapse;margin:14px 0"),
    ("caption", "text-align:left;font-weight:600;padding:4px 0"),
    ("th,td", "border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top"),
    ("th", "background:#f4f4f4"),
    (".charts", "display:flex;flex-wrap:wrap;gap:8px"),
    ("figure", "margin:0"),
    ("figcaption.n", "font-size:12px;color:#555;max-width:560px"),
    (".t", "font-weight:600;font-size:13px"),
    (".a", "font-size:11px;fill:#444"),
    (".g", "stroke:#e6e6e6"),
    (".k", "stroke:#999"),
    (".kd", "stroke:#444;stroke-width:2;stroke-dasharray:6 4"),
    (".v", "stroke:#333;stroke-dasharray:4 3"),
)
# The class of a fragment's outer element (html_fragment): its CSS applies inside it only.
_SCOPE = "memwatch-report"


def _style(page: str, scope: str = "") -> str:
    """The report's CSS for `page`: the rules above, then the left alignment of the text columns its tables name
    (class l<i>: column i). With a scope (a class), every rule is limited to the elements inside it, and the page's
    body is left alone: a fragment shown inside another page (a notebook) restyles nothing of that page."""
    used = sorted(
        {int(i) for c in re.findall(r'<table class="([^"]*)"', page) for i in re.findall(r"\bl(\d+)", c)}
    )
    rules = [*_CSS, *((f"table.l{i} tr>:nth-child({i})", "text-align:left") for i in used)]
    if scope:
        rules = [
            (",".join(f".{scope} {part}" for part in selector.split(",")), css)
            for selector, css in rules
            if selector != "body"
        ]
    return "".join(f"{selector}{{{css}}}" for selector, css in rules)


def _rich_columns(table: Any) -> tuple[list[str], list[list[str]]]:
    """A rich Table's headers and cells as text: the text report's table shown in HTML, built once."""
    columns = [[str(c) for c in col.cells] for col in table.columns]
    return [str(col.header) for col in table.columns], [list(r) for r in zip(*columns, strict=True)]


def run_html(run: RunData, *, from_step: int | None = None, to_step: int | None = None) -> str:
    """One run's section of the HTML report (its heading, charts and tables, its alerts): what `memwatch report
    --format html` shows for the run, and what a notebook shows for it (RunData._repr_html_). The CSS is the
    container's: render_html's page, or html_fragment's."""
    from memwatch.reporters.console import tier_table

    s = [f"<h2>Run {run.run_id}: {html.escape(run.name)} <small>({html.escape(run.describe())})</small></h2>"]
    if not len(run.steps):
        return "".join(s) + "<p>No evaluations yet.</p>"
    series = run.group_series()
    groups = run.group_names()
    steps = run.steps.tolist()
    by = {(r["step"], r["group"]): r for r in series}
    s.append('<div class="charts">')
    for stat, title in (
        ("extraction_rate", "extraction rate by group"),
        ("mean_match_ratio", "mean match ratio by group"),
    ):
        s.append(
            _svg_lines(
                [
                    _Line(
                        g,
                        steps,
                        [by[(st, g)][stat] if (st, g) in by else None for st in steps],
                        _COLORS[j % len(_COLORS)],
                    )
                    for j, g in enumerate(groups)
                ],
                title,
                "step",
                percent=True,
            )
        )
    b = _pick(run, to_step, len(steps) - 1)
    a = _pick(run, from_step, 0)
    profiles = run.entropy_profiles(b)
    w = run.entropy_window
    for g, per in profiles.items():
        s.append(
            _svg_lines(
                [
                    _Line(
                        name,
                        list(range(-w, len(e["profile"]) - w)),
                        e["profile"],
                        _BUCKET_COLORS.get(name, _COLORS[j % len(_COLORS)]),
                    )
                    for j, (name, e) in enumerate(per.items())
                ],
                f"{g}: entropy profile at step {steps[b]} (nats)",
                "position vs boundary",
                vline=-0.5,
            )
        )
    tier_rows = run.tiers()
    if tier_rows:
        s.append(_exposure_chart(run, tier_rows))
    s.append("</div>")
    headers, rows = group_table(run)
    s.append(_table(headers, rows, "Groups over steps"))
    headers, rows = contrast_table(run)
    if rows:
        s.append(_table(headers, rows, "Membership: members against their control, at the last evaluation"))
    for tr in run.transitions(a, b):
        m = np.array(tr["matrix"])
        if m.sum():
            s.append(
                _table(
                    ["from \\ to", *BUCKET_NAMES],
                    [[name, *m[i].tolist()] for i, name in enumerate(BUCKET_NAMES)],
                    f"{tr['group']}: transitions, step {tr['from_step']} → {tr['to_step']}",
                )
            )
    if tier_rows:
        # The text report's dose-response table (reporters.console.tier_table), every step's rows, with a step
        # column in front: its columns and formats, the match column included, come from one place.
        headers, rows = _rich_columns(tier_table(tier_rows))
        s.append(
            _table(
                ["step", *headers],
                [[str(r["step"]), *row] for r, row in zip(tier_rows, rows, strict=True)],
                "Canaries: dose-response",
            )
        )
    timelines = [p for p in run.timelines() if p["first_memorized_step"] is not None]
    s.append(
        _table(
            ["probe", "group", "tier", "first memorized", "forgotten at", "re-memorized at", "at end"],
            [
                [
                    _probe_name(p),
                    p["group"],
                    p.get("repetitions", ""),
                    p["first_memorized_step"],
                    ", ".join(map(str, p["forgotten_steps"])) or "-",
                    ", ".join(map(str, p["rememorized_steps"])) or "-",
                    "yes" if p["memorized_at_end"] else "no",
                ]
                for p in timelines
            ],
            f"Probe timelines ({len(timelines)} ever memorized)",
        )
    )
    s.append(
        _table(
            ["group", "bucket", "n", "before", "after", "jump"],
            [
                [g, bucket, e["n"], _f(e["pre"], ".2f"), _f(e["post"], ".2f"), _f(e["jump"], "+.2f")]
                for g, per in profiles.items()
                for bucket, e in per.items()
            ],
            f"Entropy across the boundary at step {steps[b]}",
        )
    )
    if run.alerts:
        s.append(
            _table(
                ["step", "rule", "group", "action", "message"],
                [
                    [x["step"], x["rule"], x["group"] or "", x["action"] or "", x["message"]]
                    for x in run.alerts
                ],
                "Alerts",
            )
        )
    return "".join(s)


def html_fragment(sections: Sequence[str], heading: str = "") -> str:
    """Report sections as one fragment for another page (a notebook's output cell): no document around it, the
    report's CSS limited to the fragment, inline SVG, no scripts and no external requests."""
    body = "".join(sections)
    return (
        f'<div class="{_SCOPE}"><style>{_style(body, _SCOPE)}</style>'
        f"{f'<p>{html.escape(heading)}</p>' if heading else ''}{body}</div>"
    )


def render_html(history: History, *, from_step: int | None = None, to_step: int | None = None) -> str:
    """One self-contained HTML file (inline CSS and SVG; no scripts, no external requests)."""
    sections = "".join(run_html(run, from_step=from_step, to_step=to_step) for run in history.all_runs())
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>memwatch report</title>"
        f"<style>{_style(sections)}</style></head><body><h1>memwatch report</h1><p>{html.escape(history.path)}</p>"
        f"{sections}</body></html>"
    )


# --- compare ------------------------------------------------------------------------------------------------------


def compare_dict(a: RunData, b: RunData) -> dict[str, Any]:
    """Two runs side by side: every statistic of each group at each run's last evaluation (A, B, B - A), and the
    extraction rate at the steps both evaluated."""

    def last(run: RunData) -> dict[str, dict[str, Any]]:
        rows = [r for r in run.group_series() if r["step"] == int(run.steps[-1])] if len(run.steps) else []
        return {r["group"]: r for r in rows}

    la, lb = last(a), last(b)
    groups = [g for g in dict.fromkeys([*la, *lb])]
    final = []
    for g in groups:
        row: dict[str, Any] = {"group": g}
        ra, rb = la.get(g, {}), lb.get(g, {})
        for stat in dict.fromkeys([*ra, *rb]):
            va, vb = ra.get(stat), rb.get(stat)
            if not all(v is None or isinstance(v, int | float) for v in (va, vb)) or stat in (
                "step",
                "group",
            ):
                continue  # numbers only (the buckets and the boundary are in the reports)
            row[stat] = {"a": va, "b": vb, "b_minus_a": None if va is None or vb is None else vb - va}
        final.append(row)
    common = sorted(set(a.steps.tolist()) & set(b.steps.tolist()))
    sa = {(r["step"], r["group"]): r for r in a.group_series()}
    sb = {(r["step"], r["group"]): r for r in b.group_series()}
    over = [
        {
            "step": st,
            "group": g,
            "extraction_rate_a": sa[(st, g)]["extraction_rate"],
            "extraction_rate_b": sb[(st, g)]["extraction_rate"],
        }
        for st in common
        for g in groups
        if (st, g) in sa and (st, g) in sb
    ]
    return {
        "a": _side(a),
        "b": _side(b),
        "final": final,
        "common_steps": over,
    }


def _probe_name(timeline: dict[str, Any]) -> str:
    """A probe as alerts name it: its id, and a canary's manifest id beside it."""
    canary = timeline.get("canary_id")
    return timeline["id"] + (f" (canary {canary})" if canary else "")


def _side(run: RunData) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "name": run.name,
        "source": run.source,
        "started": run.started,
        "status": run.status,
        "history": run.history,
        "mode": run.mode,
        "last_step": int(run.steps[-1]) if len(run.steps) else None,
    }


def render_compare(d: dict[str, Any], width: int = 120) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table as _Table

    def Table(**kw: Any) -> _Table:
        return _Table(box=box.SIMPLE, **kw)

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)

    def side(s: dict[str, Any], where: bool) -> str:
        # Told apart even when both runs share a name: run id, source and start time, how it ended, and the
        # history file when that is all that differs.
        extra = [s.get("source"), f"started {s['started']}" if s.get("started") else None]
        extra += [f"step {s['last_step']}", None if s.get("mode", "full") == "full" else f"mode {s['mode']}"]
        extra.append(s["status"] if s.get("status") not in (None, "finished") else None)
        extra.append(f"in {s['history']}" if where and s.get("history") else None)
        return f"{s['name']} #{s['run_id']} ({', '.join(x for x in extra if x)})"

    where = side(d["a"], False) == side(d["b"], False)
    console.print(f"A = {side(d['a'], where)}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"B = {side(d['b'], where)}", soft_wrap=True, highlight=False, markup=False)
    t = Table(title="last evaluation of each", title_justify="left", header_style="bold")
    for col in ("group", "metric", "A", "B", "B - A"):
        t.add_column(col, justify="left" if col in ("group", "metric") else "right")
    headline = {a.stat: a for mode in ("full", "exact") for a in REGISTRY.headline(mode)}
    for row in d["final"]:
        for stat, agg in headline.items():
            v = row.get(stat)
            if v is None or (v["a"] is None and v["b"] is None):
                continue
            delta = "-" if v["b_minus_a"] is None else format(v["b_minus_a"], "+" + agg.fmt)
            t.add_row(row["group"], agg.title, _f(v["a"], agg.fmt), _f(v["b"], agg.fmt), delta)
    _show(console, t)
    if d["common_steps"]:
        t = Table(
            title="extraction rate at the steps both evaluated", title_justify="left", header_style="bold"
        )
        for col in ("step", "group", "A", "B"):
            t.add_column(col, justify="right")
        for r in d["common_steps"]:
            t.add_row(
                str(r["step"]),
                r["group"],
                _f(r["extraction_rate_a"], ".1%"),
                _f(r["extraction_rate_b"], ".1%"),
            )
        _show(console, t)
    return out.getvalue()
