"""TensorBoard: memwatch's own event files, one sub-run per group, canary tier and pair, so that one tag overlays
across them in distinct colours (what TensorBoard does with runs); everything written is what the registry holds."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from memwatch.record import EvalRecord
from memwatch.reporters.plot import render_profiles
from memwatch.signals import REGISTRY
from memwatch.signals.buckets import BUCKET_NAMES
from memwatch.signals.registry import Scope

__all__ = ["TensorBoardReporter", "documented_tags", "export_history", "tag_table"]

PREFIX = "memwatch"
# Tags of a tier's run and a pair's run carry their kind, so that no chart mixes a group's extraction rate with a
# tier's: memwatch/extraction_rate (groups), memwatch/canaries/extraction_rate (tiers), memwatch/pairs/... (pairs).
_TAG_HEAD = {"group": PREFIX, "tier": f"{PREFIX}/canaries", "pair": f"{PREFIX}/pairs"}
_RUN_PATTERN = {"group": "<group>", "tier": "canaries_<r>x", "pair": "<member>~<control>"}


def _safe(name: str) -> str:
    """A group, bucket or scope name as a TensorBoard tag component or run directory name."""
    return re.sub(r"[^A-Za-z0-9_.~\-]", "_", name)


def run_name(scope: Scope) -> str:
    """The sub-run (directory under the TensorBoard log dir) a scope's numbers go to."""
    return _safe(scope.key.replace("/", "_"))


def _tag(scope_kind: str, stat: str) -> str:
    return f"{_TAG_HEAD[scope_kind]}/{'/'.join(_safe(p) for p in stat.split('/'))}"


def _doc_tag(scope_kind: str, pattern: str) -> str:
    return f"{_TAG_HEAD[scope_kind]}/{pattern}"


def documented_tags() -> Iterator[tuple[str, str, str, str]]:
    """Every (run, tag, kind, meaning) memwatch writes, from the registry; README.md's table is made from it."""
    root = "(the log dir)"
    yield root, f"{PREFIX}/eval_seconds", "scalar", "wall time of the evaluation"
    yield root, f"{PREFIX}/probes", "scalar", "panel size"
    yield (
        root,
        f"{PREFIX}/alerts",
        "text",
        "every alert of the step, in one entry per step (rule and message)",
    )
    for kind in ("group", "tier", "pair"):
        run = _RUN_PATTERN[kind]
        for stat in REGISTRY.group_stats.values():
            if kind in stat.scopes:
                for name, out_kind, meaning in stat.outputs:
                    applies = {"twins_n": "tier", "control_n": "pair"}.get(name, kind)
                    if out_kind in ("scalar", "image") and applies == kind:
                        yield run, _doc_tag(kind, name), out_kind, meaning
        for signal in REGISTRY:
            for agg in signal.aggregates:
                if kind in agg.scopes:
                    yield (
                        run,
                        _doc_tag(kind, agg.stat),
                        "scalar",
                        agg.meaning or f"{agg.how} of {signal.name}",
                    )
                if kind == "tier" and "twins" in agg.scopes:
                    yield run, _doc_tag(kind, f"twins_{agg.stat}"), "scalar", "the same for the tier's twins"
            if kind == "group" and signal.histogram:
                yield run, _doc_tag(kind, signal.name), "histogram", f"{signal.name} of the group's probes"
    # Contrasts: one row per output for every membership signal (<signal>: loss, min_k_plus, suffix_nll, ...).
    members = ", ".join(s.name for s in REGISTRY.signals.values() if s.membership)
    for kind in ("tier", "pair"):
        for contrast in REGISTRY.contrasts.values():
            if kind in contrast.scopes:
                for output, meaning in contrast.outputs:
                    yield (
                        _RUN_PATTERN[kind],
                        _doc_tag(kind, f"<signal>_{output}"),
                        "scalar",
                        f"{meaning} (<signal>: {members})",
                    )


def tag_table() -> str:
    """The Markdown table of every tag memwatch writes (README.md embeds it)."""
    lines = ["| run | tag | kind | meaning |", "|---|---|---|---|"]
    seen = set()
    for run, tag, kind, meaning in documented_tags():
        if (run, tag) not in seen:
            seen.add((run, tag))
            lines.append(f"| `{run}` | `{tag}` | {kind} | {meaning} |")
    return "\n".join(lines)


def _layout() -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: one multi-line chart per headline statistic, each line a group (or a tier)."""
    groups = {
        a.title: ["Multiline", [rf"^{re.escape(_tag('group', a.stat))}$"]]
        for mode in ("full", "exact")
        for a in REGISTRY.headline(mode)
    }
    # A tier's canaries and its twins (the control) on one chart: TensorBoard colours by sub-run, so a tier's two
    # lines share its colour, the twins' being the one that stays low.
    tiers = {
        title: [
            "Multiline",
            [rf"^{re.escape(_tag('tier', stat))}$", rf"^{re.escape(_tag('tier', 'twins_' + stat))}$"],
        ]
        for title, stat in (
            ("extraction rate by tier, canaries and their twins", "extraction_rate"),
            ("exposure by tier (bits), canaries and their twins", "median_exposure"),
        )
    }
    # One chart per bucket, a line per group: 6 buckets x 4 groups on one chart was unreadable (same colours).
    buckets = {
        f"{what} {name}": ["Multiline", [rf"^{PREFIX}/{tag}/{re.escape(name)}$"]]
        for tag, what in (("bucket", "probes in bucket"), ("boundary_jump", "boundary jump, bucket"))
        for name in BUCKET_NAMES
    }
    return {
        "memwatch: groups": groups,
        "memwatch: canaries (dose-response)": tiers,
        "memwatch: buckets": buckets,
    }


class TensorBoardReporter:
    """Writes EvalRecords under <log_dir>: run-level tags at the top, each scope in its own sub-run; private files
    (0600, directories 0700), flushed after every evaluation."""

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike[str], *, purge_step: int | None = None) -> None:
        from memwatch.store.files import private_makedirs

        self.log_dir = private_makedirs(log_dir)
        self.purge_step = purge_step
        self.writers: dict[str, Any] = {}
        self._alerts: dict[int, list[str]] = {}
        self._writer("").add_custom_scalars(_layout())

    def _writer(self, run: str) -> Any:
        """The SummaryWriter of a sub-run ("" the log dir itself), created owner-only on first use."""
        if run not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            from memwatch.store.files import private_makedirs

            path = private_makedirs(os.path.join(self.log_dir, run)) if run else self.log_dir
            before = set(os.listdir(path))
            self.writers[run] = SummaryWriter(log_dir=path, purge_step=self.purge_step)
            for name in set(os.listdir(path)) - before:  # the event file, created with the umask's mode
                if os.path.isfile(os.path.join(path, name)):
                    os.chmod(os.path.join(path, name), 0o600)
        return self.writers[run]

    def write(self, record: EvalRecord) -> None:
        step = record.step
        root = self._writer("")
        root.add_scalar(f"{PREFIX}/eval_seconds", record.duration, step)
        root.add_scalar(f"{PREFIX}/probes", len(record.probe_ids), step)
        histograms = [s.name for s in REGISTRY if s.histogram and s.name in record.values]
        for scope in record.scopes:
            w = self._writer(run_name(scope))
            for stat, value in record.scope(scope.key).items():
                if np.isfinite(value):
                    w.add_scalar(_tag(scope.kind, stat), value, step)
            if scope.kind != "group" or not len(scope.rows):
                continue
            for name in histograms:
                values = np.asarray(record.values[name], dtype=np.float64)[scope.rows]
                values = values[np.isfinite(values)]
                if values.size:
                    w.add_histogram(_tag("group", name), values, step, bins=[i / 10 for i in range(11)])
            self._profile_image(w, record, scope)
        if record.result is not None and record.result.hidden_prefix is not None:
            self._embedding(record)
        for w in self.writers.values():
            w.flush()

    EMBEDDING_TAG = f"{PREFIX}/probes"
    EMBEDDING_COLUMNS = ("probe", "group", "tier", "bucket", "match_ratio", "kind", "exposure")

    def _embedding(self, record: EvalRecord) -> None:
        """The probes' mean-pooled prefix representations to TensorBoard's projector (one snapshot per step), with
        metadata columns to colour them by; earlier snapshots of this log dir (a resumed run) stay listed."""
        import torch
        from google.protobuf import text_format
        from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

        from memwatch.signals.buckets import BUCKET_NAMES, bucket_signal
        from memwatch.signals.kinds import kind_of

        assert record.result is not None and record.result.hidden_prefix is not None
        w = self._writer("")
        config_path = os.path.join(self.log_dir, "projector_config.pbtxt")
        if not hasattr(w, "_projector_config"):  # SummaryWriter rewrites the file from its own list: seed it
            w._projector_config = ProjectorConfig()
            if os.path.exists(config_path):
                with open(config_path) as f:
                    text_format.Parse(f.read(), w._projector_config)
        values = record.values
        n = len(record.probe_ids)
        buckets = values.get(bucket_signal(record.mode), np.full(n, -1))
        ratio = values.get("match_ratio", np.full(n, np.nan))
        kinds = (
            kind_of(values["kind_evidence"], values["memorized"])
            if "kind_evidence" in values and "memorized" in values
            else np.full(n, "")
        )
        exposure = record.exposure if record.exposure is not None else np.full(n, np.nan)

        def cell(value: Any) -> str:
            text = "" if value is None else str(value)
            return text.replace("\t", " ").replace("\n", " ")

        rows = []
        for i, pid in enumerate(record.probe_ids):
            meta = record.metas[i]
            tier = f"{meta['repetitions']}x" if meta.get("repetitions") is not None else ""
            b = int(buckets[i])
            rows.append(
                [
                    cell(pid),
                    cell(record.groups[i]),
                    tier,
                    BUCKET_NAMES[b] if 0 <= b < len(BUCKET_NAMES) else "",
                    f"{float(ratio[i]):.3f}" if np.isfinite(ratio[i]) else "",
                    cell(kinds[i]) or "not memorized",
                    f"{float(exposure[i]):.2f}" if np.isfinite(exposure[i]) else "",
                ]
            )
        subdir = f"{record.step:05d}"
        w.add_embedding(
            torch.from_numpy(record.result.hidden_prefix.astype(np.float32)),
            metadata=rows,
            metadata_header=list(self.EMBEDDING_COLUMNS),
            global_step=record.step,
            tag=self.EMBEDDING_TAG,
        )
        # One entry per snapshot (a step evaluated again after a resume replaces its own), rewritten whole.
        latest = {e.tensor_path: e for e in w._projector_config.embeddings}
        del w._projector_config.embeddings[:]
        w._projector_config.embeddings.extend(latest.values())
        with open(config_path, "w") as f:
            f.write(text_format.MessageToString(w._projector_config))
        for folder, _dirs, files in os.walk(os.path.join(self.log_dir, subdir)):
            os.chmod(folder, 0o700)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o600)
        os.chmod(config_path, 0o600)

    def _profile_image(self, writer: Any, record: EvalRecord, scope: Scope) -> None:
        prefix = "" if record.mode == "full" else "tf_"
        view = record.stats[scope.key]
        profiles = view.profiles
        if profiles:
            counts = dict(
                zip(("0-20", "20-40", "40-60", "60-80", "80-99", "exact"), view.buckets, strict=True)
            )
            img = render_profiles(
                profiles,
                record.spec["entropy_window"],
                title=f"{scope.key}  step {record.step}",
                counts=counts,
            )
            writer.add_image(_tag("group", f"{prefix}entropy_profile"), img, record.step, dataformats="HWC")

    def add_alert(self, alert: Any) -> None:
        """Buffer an alert until flush_alerts(): TensorBoard keeps one text entry per tag and step, so every alert
        of a step goes into one entry (one alert never hides another)."""
        self._alerts.setdefault(alert.step, []).append(f"- **{alert.rule}** — {alert.message}")

    def flush_alerts(self) -> None:
        root = self._writer("")
        for step, lines in sorted(self._alerts.items()):
            root.add_text(f"{PREFIX}/alerts", "\n".join(lines), step)
        self._alerts.clear()
        root.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def export_history(history: Any, log_dir: str | os.PathLike[str]) -> list[str]:
    """Write a history (e.g. from a scan) as TensorBoard event files with the live monitor's tags.

    Each run goes to <log_dir>/<run name>; evaluations are replayed through the same record building, so the
    transitions, boundary statistics and dose-response tags are those the live monitor would have written.
    """
    from types import SimpleNamespace

    written = []
    for run in history.all_runs():
        path = os.path.join(os.fspath(log_dir), _safe(run.name) or f"run{run.run_id}")
        reporter = TensorBoardReporter(path)
        for record in run.replayed():
            reporter.write(record)
        for alert in history.store.alerts(run.run_id):
            reporter.add_alert(SimpleNamespace(**alert))
        reporter.flush_alerts()
        reporter.close()
        written.append(path)
    return written
