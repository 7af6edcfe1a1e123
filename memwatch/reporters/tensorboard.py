"""TensorBoard reporter: memwatch's own event files (scalars, histograms, entropy-profile images, text)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..evaluation import EvalRecord
from ..metrics import BUCKET_NAMES
from .plot import render_profiles

__all__ = ["TensorBoardReporter", "tag_table"]

PREFIX = "memwatch"


def _safe(name: str) -> str:
    """Group and bucket names as TensorBoard tag components."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


# (tag under memwatch/<group>/, kind, meaning) — the README's tag table is generated from this list.
GROUP_TAGS: tuple[tuple[str, str, str], ...] = (
    ("extraction_rate", "scalar", "share of the group's probes extracted exactly"),
    ("memorized_rate", "scalar", "share counted as memorized (exact, or match ratio >= memorized_threshold)"),
    ("mean_match_ratio", "scalar", "mean fraction of suffix tokens reproduced"),
    ("mean_edit_similarity", "scalar", "mean 1 - token Levenshtein / m"),
    ("mean_suffix_nll", "scalar", "mean NLL of the true suffix (nats/token)"),
    ("newly_memorized", "scalar", "probes memorized now and not at the previous evaluation"),
    ("forgotten", "scalar", "probes memorized at the previous evaluation and not now"),
    ("rememorized", "scalar", "newly memorized probes that had been memorized before"),
    ("bucket/<bucket>", "scalar", "probes per match-ratio bucket (0-20, 20-40, 40-60, 60-80, 80-99, exact)"),
    (
        "boundary_jump/<bucket>",
        "scalar",
        "mean entropy of the first j generated minus the last j prefix positions",
    ),
    ("entropy_pre/<bucket>", "scalar", "mean entropy over the last j prefix positions (teacher-forced)"),
    (
        "entropy_post/<bucket>",
        "scalar",
        "mean entropy over the first j generated positions (greedy path; teacher-forced in mode exact)",
    ),
    (
        "median_exposure",
        "scalar",
        "median canary exposure in bits (canary groups, when exposure is computed)",
    ),
    ("match_ratio", "histogram", "match ratios of the group's probes"),
    ("entropy_profile", "image", "mean entropy profile per bucket across the boundary"),
)
TIER_TAGS: tuple[tuple[str, str, str], ...] = (
    ("extraction_rate", "scalar", "share of the tier's inserted canaries extracted exactly"),
    ("twins_extraction_rate", "scalar", "the same for its never-inserted twins: the false-positive rate"),
    ("median_exposure", "scalar", "median exposure (bits) of the tier's inserted canaries"),
    ("twins_median_exposure", "scalar", "median exposure of its twins (the control)"),
    ("mean_match_ratio", "scalar", "mean match ratio of the tier's inserted canaries"),
)
RUN_TAGS: tuple[tuple[str, str, str], ...] = (
    ("eval_seconds", "scalar", "wall time of the evaluation"),
    ("probes", "scalar", "panel size"),
    ("alerts", "text", "every alert of the step, one entry per step (rule and message)"),
)


def tag_table() -> str:
    """The Markdown table of every tag memwatch writes (README.md embeds it)."""
    lines = ["| tag | kind | meaning |", "|---|---|---|"]
    for tag, kind, meaning in RUN_TAGS:
        lines.append(f"| `{PREFIX}/{tag}` | {kind} | {meaning} |")
    for tag, kind, meaning in GROUP_TAGS:
        lines.append(f"| `{PREFIX}/<group>/{tag}` | {kind} | {meaning} |")
    for tag, kind, meaning in TIER_TAGS:
        lines.append(f"| `{PREFIX}/canaries/<r>x/{tag}` | {kind} | {meaning} (r: repetitions) |")
    return "\n".join(lines)


def _layout(groups: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: one multi-line chart per metric across groups, and per-group detail charts."""
    across = {
        "extraction rate": "extraction_rate",
        "memorized rate": "memorized_rate",
        "mean match ratio": "mean_match_ratio",
        "mean edit similarity": "mean_edit_similarity",
        "mean suffix NLL": "mean_suffix_nll",
        "newly memorized": "newly_memorized",
        "forgotten": "forgotten",
        "median exposure": "median_exposure",
    }
    layout: dict[str, dict[str, list[Any]]] = {
        "memwatch: all groups": {
            title: ["Multiline", [rf"{PREFIX}/[^/]+/{tag}$"]] for title, tag in across.items()
        }
    }
    layout["memwatch: canaries (dose-response)"] = {
        "extraction rate by tier": ["Multiline", [rf"{PREFIX}/canaries/[^/]+/extraction_rate$"]],
        "twins' extraction rate by tier": ["Multiline", [rf"{PREFIX}/canaries/[^/]+/twins_extraction_rate$"]],
        "exposure by tier": ["Multiline", [rf"{PREFIX}/canaries/[^/]+/median_exposure$"]],
        "twins' exposure by tier": ["Multiline", [rf"{PREFIX}/canaries/[^/]+/twins_median_exposure$"]],
    }
    for g in groups:
        sg = re.escape(_safe(g))
        layout[f"memwatch: {g}"] = {
            "buckets": ["Multiline", [rf"{PREFIX}/{sg}/bucket/.*"]],
            "boundary jump by bucket": ["Multiline", [rf"{PREFIX}/{sg}/boundary_jump/.*"]],
            "entropy before / after the boundary": [
                "Multiline",
                [rf"{PREFIX}/{sg}/entropy_pre/.*", rf"{PREFIX}/{sg}/entropy_post/.*"],
            ],
        }
    return layout


class TensorBoardReporter:
    """Writes EvalRecords to <log_dir> with its own SummaryWriter, flushed after every evaluation."""

    def __init__(
        self, log_dir: str | os.PathLike[str], groups: Iterable[str], *, purge_step: int | None = None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from ..files import private_makedirs

        self.log_dir = private_makedirs(log_dir)
        before = set(os.listdir(self.log_dir))
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)
        for name in set(os.listdir(self.log_dir)) - before:  # the event file, created with the umask's mode
            os.chmod(os.path.join(self.log_dir, name), 0o600)
        self.groups = list(groups)
        self._alerts: dict[int, list[str]] = {}
        self.writer.add_custom_scalars(_layout(self.groups))

    def write(self, record: EvalRecord) -> None:
        w, step = self.writer, record.step
        w.add_scalar(f"{PREFIX}/eval_seconds", record.duration, step)
        w.add_scalar(f"{PREFIX}/probes", len(record.probe_ids), step)
        ratio = record.result.match_ratio
        for g, st in record.stats.items():
            base = f"{PREFIX}/{_safe(g)}"
            scalars = {
                "extraction_rate": st.extraction_rate,
                "memorized_rate": st.memorized_rate,
                "mean_match_ratio": st.mean_match_ratio,
                "mean_edit_similarity": st.mean_edit_similarity,
                "mean_suffix_nll": st.mean_suffix_nll,
                "newly_memorized": st.newly_memorized,
                "forgotten": st.forgotten,
                "rememorized": st.rememorized,
                "median_exposure": st.median_exposure,
            }
            for name, value in scalars.items():
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    w.add_scalar(f"{base}/{name}", value, step)
            for name, count in zip(BUCKET_NAMES, st.buckets, strict=True):
                w.add_scalar(f"{base}/bucket/{_safe(name)}", count, step)
            for name, (pre, post, jump) in st.boundary.items():
                if math.isfinite(jump):
                    w.add_scalar(f"{base}/boundary_jump/{_safe(name)}", jump, step)
                    w.add_scalar(f"{base}/entropy_pre/{_safe(name)}", pre, step)
                    w.add_scalar(f"{base}/entropy_post/{_safe(name)}", post, step)
            if ratio is not None and st.n:
                w.add_histogram(
                    f"{base}/match_ratio", ratio[record.groups == g], step, bins=[i / 10 for i in range(11)]
                )
            if st.profiles:
                counts = {
                    name: st.buckets[BUCKET_NAMES.index(name)] for name in st.profiles if name in BUCKET_NAMES
                }
                img = render_profiles(
                    st.profiles, record.result.entropy_window, title=f"{g}  step {step}", counts=counts
                )
                w.add_image(f"{base}/entropy_profile", img, step, dataformats="HWC")
        for row in record.tiers:
            base = f"{PREFIX}/canaries/{row['repetitions']}x"
            values = {
                "extraction_rate": row["inserted_extracted"] / row["inserted"] if row["inserted"] else None,
                "twins_extraction_rate": row["twins_extracted"] / row["twins"] if row["twins"] else None,
                "median_exposure": row["median_exposure"],
                "twins_median_exposure": row["twins_median_exposure"],
                "mean_match_ratio": row["mean_match_ratio"],
            }
            for name, value in values.items():
                if value is not None and math.isfinite(value):
                    w.add_scalar(f"{base}/{name}", value, step)
        self.writer.flush()

    def add_alert(self, alert: Any) -> None:
        """Buffer an alert until flush_alerts(): TensorBoard keeps one text entry per tag and step, so every alert
        of a step goes into one entry (one alert never hides another)."""
        self._alerts.setdefault(alert.step, []).append(f"- **{alert.rule}** — {alert.message}")

    def flush_alerts(self) -> None:
        for step, lines in sorted(self._alerts.items()):
            self.writer.add_text(f"{PREFIX}/alerts", "\n".join(lines), step)
        self._alerts.clear()
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def export_history(history: Any, log_dir: str | os.PathLike[str]) -> list[str]:
    """Write a history (e.g. from a scan) as TensorBoard event files with the live monitor's tags.

    Each run goes to <log_dir>/<run name>; evaluations are replayed through the same record building, so the
    transitions, boundary statistics and dose-response tags are those the live monitor would have written.
    """
    written = []
    for run in history.all_runs():
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", run.name) or f"run{run.run_id}"
        path = os.path.join(os.fspath(log_dir), name)
        reporter = TensorBoardReporter(path, run.group_names())
        for _e, record in run.records():
            reporter.write(record)
        from types import SimpleNamespace

        for alert in history.store.alerts(run.run_id):
            reporter.add_alert(SimpleNamespace(**alert))
        reporter.flush_alerts()
        reporter.close()
        written.append(path)
    return written
