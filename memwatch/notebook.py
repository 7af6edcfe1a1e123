"""The usual figures of a run on matplotlib: rates over steps, dose-response, entropy profile, transitions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from memwatch.reporters.plot import BUCKET_COLORS
from memwatch.signals import REGISTRY

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

    from memwatch.store.runs import RunData

__all__ = ["plot_dose_response", "plot_entropy_profile", "plot_rates", "plot_transitions"]

# A dot per evaluation while there are few (where the line was measured), as the HTML report's charts.
_MARKERS_UP_TO = 25


def _pyplot() -> Any:
    """matplotlib.pyplot, imported here only (an optional extra): checked first, before any work."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("memwatch.notebook needs matplotlib: pip install 'memwatch[notebook]'") from exc
    return plt


def _axes(ax: Axes | None) -> Axes:
    """`ax`, or the Axes of a new figure (made once the data is known to be there: no empty figure left behind)."""
    if ax is None:
        _fig, ax = _pyplot().subplots(figsize=(7, 4), layout="constrained")
    return ax


def _aggregate(stat: str) -> Any:
    """The registry's aggregate behind a statistic (its title and format), or None for one it does not name."""
    for signal in REGISTRY.signals.values():
        for a in signal.aggregates:
            if stat in (a.stat, f"twins_{a.stat}"):
                return a
    return None


def _y_axis(ax: Axes, stat: str) -> None:
    """The statistic's title on the y axis, and rates (the registry prints them with "%") in percent."""
    from matplotlib.ticker import PercentFormatter

    a = _aggregate(stat)
    ax.set_ylabel(a.title if a is not None else stat)
    if a is not None and a.fmt.endswith("%"):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _measured(frame: Any, stat: str, what: str) -> None:
    """A statistic the frame holds as numbers for at least one row, else a ValueError naming those it has."""
    numeric = [c for c in frame.columns if frame[c].dtype.kind == "f" and frame[c].notna().any()]
    if stat not in numeric:
        raise ValueError(f"{what} has no measured statistic {stat!r}; it has: {', '.join(numeric)}")


def _labelled(ax: Axes, xlabel: str, title: str, legend: str | None = None) -> Axes:
    """The x label, title, a light grid and the legend every line figure here has."""
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title=legend, fontsize="small")
    return ax


def plot_rates(run: RunData, ax: Axes | None = None, stat: str = "extraction_rate") -> Axes:
    """A group statistic over the training steps, one line per group (RunData.series_frame's `stat` column:
    extraction_rate, mean_match_ratio, median_exposure, ...). Returns the Axes."""
    _pyplot()
    frame = run.series_frame()
    _measured(frame, stat, f"run {run.name!r}")
    ax = _axes(ax)
    for group in run.group_names():
        rows = frame[frame["group"] == group]
        ax.plot(
            rows["step"].to_numpy(),
            rows[stat].to_numpy(dtype=float),
            marker="o" if len(rows) <= _MARKERS_UP_TO else None,
            markersize=3,
            label=group,
        )
    _y_axis(ax, stat)
    return _labelled(ax, "step", f"{run.name}: {stat.replace('_', ' ')} by group")


def plot_dose_response(
    run: RunData, ax: Axes | None = None, stat: str = "extraction_rate", step: int = -1
) -> Axes:
    """The canaries' dose-response at one evaluation (default: the last): `stat` of each repetition tier's inserted
    canaries against how often they were inserted (log scale), solid, and of their never-inserted twins, dashed
    (the control), from RunData.tiers_frame (stat: extraction_rate, median_exposure, ...). Returns the Axes."""
    _pyplot()
    frame = run.tiers_frame()
    if frame.empty:
        raise ValueError(f"run {run.name!r} has no canary tiers (a panel with inserted canaries has)")
    _measured(frame, stat, f"run {run.name!r}'s canary tiers")
    at = int(run.steps[run.index_of(step)])
    rows = frame[frame["step"] == at].sort_values("repetitions")
    reps = rows["repetitions"].to_numpy()
    ax = _axes(ax)
    (line,) = ax.plot(reps, rows[stat].to_numpy(dtype=float), marker="o", label="inserted canaries")
    twins = f"twins_{stat}"
    if twins in rows.columns and rows[twins].notna().any():
        ax.plot(
            reps,
            rows[twins].to_numpy(dtype=float),
            marker="o",
            linestyle="--",
            color=line.get_color(),
            label="twins (never inserted)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(reps, [f"{r}x" for r in reps])
    ax.minorticks_off()
    _y_axis(ax, stat)
    return _labelled(
        ax, "repetitions in the training data", f"{run.name}: canaries' dose-response at step {at}"
    )


def plot_entropy_profile(
    run: RunData, step: int = -1, group: str | None = None, ax: Axes | None = None
) -> Axes:
    """The mean entropy per position across the prefix/continuation boundary at one evaluation (default: the
    last), one line per match bucket (RunData.entropy_profiles), for one group (default: the run's first, train
    when it has one). Positions are relative to the boundary: the prefix's last tokens are negative, the
    continuation starts at 0; a dashed vertical line marks the boundary. Returns the Axes."""
    _pyplot()
    index = run.index_of(step)
    profiles = run.entropy_profiles(index)
    group = group if group is not None else next(iter(profiles), None)
    if group not in profiles:
        raise ValueError(
            f"run {run.name!r} has no entropy profile of group {group!r}; groups: {list(profiles)}"
        )
    ax = _axes(ax)
    w = run.entropy_window
    for bucket, entry in profiles[group].items():
        color = np.array(BUCKET_COLORS[bucket]) / 255 if bucket in BUCKET_COLORS else None
        profile = np.asarray(entry["profile"], dtype=float)
        ax.plot(
            np.arange(-w, len(profile) - w),
            profile,
            marker="o",
            color=color,
            label=f"{bucket} (n={entry['n']})",
        )
    ax.axvline(-0.5, color="0.3", linestyle="--", linewidth=1)
    ax.set_ylabel("mean entropy (nats)")
    return _labelled(
        ax,
        "position relative to the boundary (prefix < 0 <= continuation)",
        f"{run.name}, {group}: entropy profile at step {int(run.steps[index])}",
        legend="bucket",
    )


def plot_transitions(
    run: RunData,
    from_step: int | None = None,
    to_step: int | None = None,
    ax: Axes | None = None,
    group: str | None = None,
) -> Axes:
    """The bucket transition matrix between two evaluations (default: the first and the last) as a heat map with
    its counts written in (RunData.transitions_frame): rows the bucket at from_step, columns the bucket at
    to_step, over one group's probes (default: every group). Returns the Axes."""
    _pyplot()
    frame = run.transitions_frame(from_step, to_step, group=group)
    counts = frame.to_numpy()
    ax = _axes(ax)
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    high = counts.max() or 1
    for (i, j), n in np.ndenumerate(counts):
        if n:  # dark cells get white digits
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > high / 2 else "black")
    ax.set_xticks(range(len(frame.columns)), list(frame.columns))
    ax.set_yticks(range(len(frame.index)), list(frame.index))
    ax.set_xlabel(f"bucket at step {frame.attrs['to_step']}")
    ax.set_ylabel(f"bucket at step {frame.attrs['from_step']}")
    ax.set_title(f"{run.name}, {group or 'every group'}: transitions")
    image.set_label("probes")
    return ax
