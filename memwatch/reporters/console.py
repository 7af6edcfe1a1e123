"""Console reporter: a compact rich table after each evaluation."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from memwatch.record import EvalRecord

__all__ = ["ConsoleReporter", "closing_lines", "record_table", "tier_table"]


def _fmt(value: float, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def record_table(record: EvalRecord) -> Table:
    """One row per group: size, exact extractions, rates, means, events, boundary jump of the largest bucket."""
    title = f"memwatch · step {record.step} · {len(record.probe_ids)} probes · {record.duration:.1f}s"
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold")
    for col, justify in (
        ("group", "left"),
        ("n", "right"),
        ("exact", "right"),
        ("rate", "right"),
        ("match", "right"),
        ("edit sim", "right"),
        ("nll", "right"),
        ("new", "right"),
        ("forgot", "right"),
        ("jump", "right"),
    ):
        table.add_column(col, justify=justify)
    for g, st in record.stats.items():
        jump = math.nan
        if st.boundary:
            biggest = max(st.boundary, key=lambda b: st.buckets[_bucket_index(b)])
            jump = st.boundary[biggest][2]
        rate_style = "bold red" if g in ("heldout", "canary_heldout") and st.extracted else ""
        table.add_row(
            g,
            str(st.n),
            str(st.extracted),
            f"[{rate_style}]{_fmt(st.extraction_rate, '.1%')}[/]"
            if rate_style
            else _fmt(st.extraction_rate, ".1%"),
            _fmt(st.mean_match_ratio),
            _fmt(st.mean_edit_similarity),
            _fmt(st.mean_suffix_nll),
            f"[green]+{st.newly_memorized}[/]" if st.newly_memorized else "0",
            f"[yellow]-{st.forgotten}[/]" if st.forgotten else "0",
            _fmt(jump, "+.2f"),
        )
    return table


def tier_table(
    tiers: list[dict[str, Any]], title: str = "canaries: dose-response", *, box: Any = None
) -> Table:
    """Per repetition tier: inserted canaries extracted, twins extracted (the control), exposure, first memorized.

    box: a rich box style for written reports; None, the live console's bare columns."""
    table = Table(title=title, title_justify="left", box=box, pad_edge=box is not None, header_style="bold")
    for col in (
        "repetitions",
        "extracted",
        "twins extracted",
        "exposure",
        "twins' exposure",
        "match",
        "first memorized",
    ):
        table.add_column(col, justify="right")
    for row in tiers:
        table.add_row(
            f"{row['repetitions']}x",
            f"{row['inserted_extracted']}/{row['inserted']}",
            f"{row['twins_extracted']}/{row['twins']}",
            _fmt(row["median_exposure"], ".1f") + (" bits" if row["median_exposure"] is not None else ""),
            _fmt(row["twins_median_exposure"], ".1f"),
            _fmt(row["mean_match_ratio"]),
            "-" if row["first_memorized_step"] is None else f"step {row['first_memorized_step']}",
        )
    return table


def _bucket_index(name: str) -> int:
    from memwatch.signals.buckets import BUCKET_NAMES

    return BUCKET_NAMES.index(name) if name in BUCKET_NAMES else 0


def closing_lines(
    history: str | None,
    tensorboard_logdir: str | None,
    evaluations: int,
    alerts: int,
    status: str = "finished",
) -> list[str]:
    """Where the run's files went and the commands that open them: the last thing a run prints (plain lines,
    never wrapped, so each command can be copied whole)."""
    import os

    def short(path: str) -> str:
        rel = os.path.relpath(path)
        return path if rel.startswith("..") else rel

    lines = [f"{evaluations} evaluation(s), {alerts} alert(s); the run {status}."]
    if history:
        lines.append(f"History:     {short(history)}")
        lines.append(f"Report:      memwatch report {short(history)}   (--format json|csv|html)")
    if tensorboard_logdir:
        # The legacy dashboards' smoothing slider starts at 0.6, which turns a 0 -> 1 jump into a ramp: the
        # custom-scalars link opens it at 0.
        lines.append(f"TensorBoard: tensorboard --logdir {short(tensorboard_logdir)}")
        lines.append(
            "             then http://localhost:6006/#custom_scalars&_smoothingWeight=0 (unsmoothed)"
        )
    return lines


class ConsoleReporter:
    """Prints record_table after each evaluation (the monitor calls it on rank 0 only)."""

    name = "console"

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def _beside_progress_bars(self) -> Iterator[None]:
        """Output that never lands on a progress bar's line (the Trainer's tqdm bar shares stderr): in a terminal
        the bars are cleared and redrawn around it (tqdm's own external_write_mode); in a log file, where a bar is
        a line without its newline, that line is ended first."""
        tqdm = sys.modules.get("tqdm")  # a bar can only be live where tqdm was imported
        bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()) if tqdm is not None else []
        live = [b for b in bars if not getattr(b, "disable", False)]
        if not live:
            yield
            return
        if self.console.is_terminal:
            with tqdm.tqdm.external_write_mode(file=self.console.file):
                yield
            return
        self.console.file.write("\n")
        yield

    def write(self, record: EvalRecord) -> None:
        with self._beside_progress_bars():
            self.console.print(record_table(record))
            if record.tiers:
                self.console.print(tier_table(record.tiers))

    def alert(self, alert: Any) -> None:
        from rich.markup import escape

        # Messages may quote text with brackets (reveal_text=True): escape them, never read them as markup.
        action = f"\n[bold]action:[/] {escape(alert.action)}" if alert.action else ""
        with self._beside_progress_bars():
            self._print_alert(alert, action)

    def _print_alert(self, alert: Any, action: str) -> None:
        from rich.markup import escape
        from rich.panel import Panel

        self.console.print(
            Panel(
                f"{escape(alert.message)}{action}",
                title=f"memwatch alert · {escape(alert.rule)}",
                border_style="red",
            )
        )

    def warn(self, message: str) -> None:
        """A visible warning in bold red (the message is printed as text, not markup)."""
        from rich.markup import escape

        with self._beside_progress_bars():
            self.console.print(f"[bold red]{escape(message)}[/]")

    def close(self) -> None:
        """Nothing to release: the console belongs to the process."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)
