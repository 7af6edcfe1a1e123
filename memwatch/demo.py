"""`memwatch demo`: a tiny byte-level GPT-2 learns Python's standard library, with canaries, watched live."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["DemoSettings", "demo_model", "run_demo", "stdlib_corpus"]

# Modules present on every CPython install; read as bytes, in this order, so the corpus is the same everywhere
# a given Python version runs.
STDLIB_FILES = (
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "functools.py",
    "argparse.py",
    "random.py",
    "statistics.py",
    "fractions.py",
    "difflib.py",
    "calendar.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "copy.py",
    "pprint.py",
    "abc.py",
    "numbers.py",
    "operator.py",
    "csv.py",
    "dataclasses.py",
    "enum.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/__init__.py",
    "collections/__init__.py",
    "contextlib.py",
    "base64.py",
    "ipaddress.py",
    "decimal.py",
    "locale.py",
    "gettext.py",
    "queue.py",
    "sched.py",
)
VOCAB = 257  # 256 byte values and one spare id


@dataclass(frozen=True)
class DemoSettings:
    steps: int = 800  # enough for 64x canaries to be memorized on CPU in a few minutes
    out: str = "memwatch-demo"
    every: int = 100  # evaluation cadence (the demo shows transitions as they happen)
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    tiers: tuple[int, ...] = (1, 4, 16, 64)
    canaries_per_tier: int = 2
    exposure_references: int = (
        256  # fewer than the default 1000: the demo computes exposure at every evaluation
    )
    train_bytes: int = 320_000  # how much standard-library text the model learns
    live: bool = True


def stdlib_corpus(limit: int) -> tuple[bytes, bytes]:
    """(training text, held-out text): standard-library sources, the held-out part from files never trained on."""
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in STDLIB_FILES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                texts.append(f.read())
    if len(texts) < 4:
        raise RuntimeError(f"could not read Python's standard library sources under {root}")
    held = texts[-3:]  # the last files are the held-out cohort's source
    train = b"\n".join(texts[:-3])[:limit]
    return train, b"\n".join(held)


def demo_model(seq_len: int = 128, seed: int = 0) -> Any:
    """The demo's tiny GPT-2: 4 layers, 128 wide, a byte-level vocabulary, built from a config."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=seq_len,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


_MARK = ".memwatch-demo"  # written into the demo's output directory: what the demo may remove on a rerun


def _start_over(out: str) -> bool:
    """Make `out` the demo's own, empty directory. A previous demo's files there are removed (so TensorBoard never
    mixes two demos' events, and reports open this run); anything else there is refused, never deleted."""
    import shutil

    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, _MARK)):
            raise ValueError(f"{out} exists and holds files the demo did not write; choose another --out")
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        removed = True
    else:
        removed = False
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, _MARK), "w") as f:
        f.write("this directory belongs to `memwatch demo`, which replaces it on every run\n")
    return removed


def _chunks(data: bytes, n: int) -> list[list[int]]:
    return [list(data[i : i + n]) for i in range(0, len(data) - n + 1, n)]


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Train, watch, summarize. Returns the summary (also printed)."""
    import torch
    from rich.console import Console
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from memwatch import MonitorConfig
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries
    from memwatch.integrations.hf import MemWatchCallback

    console = Console()
    hf_logging.set_verbosity_error()
    torch.manual_seed(settings.seed)
    k, m = 32, 16
    train_text, held_text = stdlib_corpus(settings.train_bytes)
    train_rows = _chunks(train_text, settings.seq_len)
    heldout_rows = _chunks(held_text, settings.seq_len)[:256]
    # Canaries: per tier, inserted ones and never-inserted twins; the manifest (it holds the secrets) is private.
    canaries = make_canaries(
        ByteTokenizer(),
        families=("digits", "password"),
        tiers=settings.tiers,
        per_tier=settings.canaries_per_tier,
        prefix_len=k,
        secret_len=m,
        references=settings.exposure_references,
        seed=settings.seed,
    )
    dataset, manifest = inject([{"input_ids": r, "labels": r} for r in train_rows], canaries)
    if _start_over(settings.out):
        console.print(f"[dim]starting over: the previous demo's files in {settings.out} were removed[/dim]")
    manifest.save(os.path.join(settings.out, "memwatch", "canaries.json"))

    model = demo_model(settings.seq_len, settings.seed)
    if not importlib.util.find_spec("tokengrams"):
        console.print(
            "[dim]no n-gram index (duplicate counts, distributional memorization): pip install "
            "'memwatch[ngrams]' to add it[/dim]"
        )
    config = MonitorConfig(
        every_n_steps=settings.every,
        prefix_len=k,
        suffix_len=m,
        entropy_window=16,
        train_probes=128,
        heldout_probes=128,  # >= 100 controls: the TPR at 1% FPR is reported, not refused
        # The training data's n-gram counts, seen so far, from the batches as they pass (memwatch[ngrams]).
        ngrams="stream" if importlib.util.find_spec("tokengrams") else "off",
        console=not settings.live,
        output_dir=os.path.join(settings.out, "memwatch"),
        exposure_references=settings.exposure_references,
    )
    callback = MemWatchCallback(config, canaries=manifest, heldout=[{"input_ids": r} for r in heldout_rows])
    args = TrainingArguments(
        output_dir=settings.out,
        per_device_train_batch_size=settings.batch_size,
        max_steps=settings.steps,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",  # settles at the end, so what is memorized stays memorized
        warmup_steps=30,
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=True,
        seed=settings.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    view = _LiveView(console, settings, callback) if settings.live else None
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, callbacks=[callback] + ([view] if view else [])
    )
    t0 = time.time()
    try:
        if view is not None:
            with view:
                trainer.train()
        else:
            trainer.train()
    except KeyboardInterrupt:
        monitor = callback.monitor
        done = len(monitor.evaluated_steps)
        history = monitor.history.path if monitor.history is not None else "the history"
        monitor.close(status="interrupted")
        console.print(
            f"\n[bold]Interrupted[/bold] at step {trainer.state.global_step} of {settings.steps}: {done} "
            f"evaluation(s) are kept in {history}, the run marked interrupted. `memwatch demo` starts over "
            f"(the files in {settings.out} are replaced)."
        )
        raise
    elapsed = time.time() - t0
    summary = _summary(callback, settings, elapsed)
    _print_summary(console, summary, settings)
    return summary


class _LiveView:
    """A TrainerCallback that keeps a rich Live display: progress, loss, and what memwatch just saw."""

    def __init__(self, console: Any, settings: DemoSettings, callback: Any) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.settings = settings
        self.callback = callback
        self.progress = Progress(
            TextColumn("[bold]training[/]"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("train", total=settings.steps, loss="-")
        self.events: list[str] = []
        self.seen_step: int | None = None
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> _LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.update(self._render())
        self.live.__exit__(*exc)
        self.console.print()

    def _render(self) -> Any:
        from rich.console import Group

        from memwatch.reporters.console import record_table, tier_table

        parts: list[Any] = [self.progress]
        record = self.callback.monitor.last_record
        if record is not None:
            parts.append(record_table(record))
            parts.append(tier_table(record.tiers, title="canaries: dose-response now"))
        if self.events:
            parts.append("[bold]transitions[/]\n" + "\n".join(self.events[-8:]))
        return Group(*parts)

    def _collect_events(self) -> None:
        record = self.callback.monitor.last_record
        if record is None or record.step == self.seen_step:
            return
        self.seen_step = record.step
        ev = record.events
        for g, st in record.stats.items():
            if st.newly_memorized or st.forgotten:
                self.events.append(
                    f"step {record.step:>5}: [cyan]{g}[/] [green]+{st.newly_memorized} memorized[/]"
                    + (f", [yellow]{st.forgotten} forgotten[/]" if st.forgotten else "")
                    + (f" ({st.rememorized} again)" if st.rememorized else "")
                )
        first_canaries = [
            i for i in range(len(record.probe_ids)) if ev["first"][i] and record.groups[i] == "canary"
        ]
        for i in first_canaries:
            tier = record.metas[i].get("repetitions")
            self.events.append(
                f"step {record.step:>5}: canary {record.probe_ids[i]} ({tier}x) became extractable"
            )

    # TrainerCallback protocol (duck-typed: only the events we need)
    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **kw: None
        raise AttributeError(name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{float(logs['loss']):.3f}")

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)
        self._collect_events()
        self.live.update(self._render())

    def on_train_end(self, args, state, control, **kwargs):
        self._collect_events()
        self.live.update(self._render())


def _summary(callback: Any, settings: DemoSettings, elapsed: float) -> dict[str, Any]:
    record = callback.monitor.last_record
    out = os.path.abspath(settings.out)
    return {
        "seconds": elapsed,
        "steps": settings.steps,
        "tiers": record.tiers if record is not None else [],
        "groups": {
            g: {"n": s.n, "extracted": s.extracted, "mean_match_ratio": s.mean_match_ratio}
            for g, s in (record.stats.items() if record is not None else [])
        },
        "membership": _membership(record),
        "kinds": _kinds(record),
        "history": os.path.join(out, "memwatch", "history.sqlite"),
        "tensorboard": os.path.join(out, "memwatch", "tb"),
        "manifest": os.path.join(out, "memwatch", "canaries.json"),
        "out": out,
    }


# What the summary shows per pair: the whole window for training text, the secret span for canaries.
_MEMBERSHIP = {
    "train~heldout": ("loss", "min_k_plus"),
    "canary~canary_heldout": ("suffix_nll", "suffix_min_k_plus"),
}


_KIND_NAMES = ("recitation", "reconstruction", "recollection")


def _kinds(record: Any) -> dict[str, dict[str, Any]]:
    """Per group at the last evaluation: how many probes are memorized, by kind, and the entropy jump across the
    boundary for each kind and for the probes not memorized (None where the group has none of them)."""
    if record is None:
        return {}
    out = {}
    for group, stats in record.stats.items():
        row: dict[str, Any] = {"n": stats.n, "memorized": stats.memorized}
        for name in (*_KIND_NAMES, "unmemorized"):
            if name != "unmemorized":
                row[name] = int(record.scalars.get(f"{group}/{name}_count", 0))
            jump = record.scalars.get(f"{group}/boundary_jump_kind/{name}")
            row[f"boundary_jump_{name}"] = None if jump is None or math.isnan(jump) else jump
        out[group] = row
    return out


def _membership(record: Any) -> list[dict[str, Any]]:
    """Per pair and signal at the last evaluation: the AUC and the TPR at 1% FPR (None: refused)."""
    if record is None:
        return []
    out = []
    for pair, signals in _MEMBERSHIP.items():
        for signal in signals:
            auc = record.scalars.get(f"{pair}/{signal}_auc")
            if auc is None:
                continue
            tpr = record.scalars.get(f"{pair}/{signal}_tpr_1pct", math.nan)
            out.append(
                {
                    "pair": pair,
                    "signal": signal,
                    "auc": auc,
                    "tpr_1pct": None if math.isnan(tpr) else tpr,
                    "tpr_1pct_ci": None
                    if math.isnan(tpr)
                    else (
                        record.scalars[f"{pair}/{signal}_tpr_1pct_lo"],
                        record.scalars[f"{pair}/{signal}_tpr_1pct_hi"],
                    ),
                }
            )
    return out


def _print_summary(console: Any, summary: dict[str, Any], settings: DemoSettings) -> None:
    from rich import box
    from rich.table import Table

    from memwatch.reporters.console import tier_table

    title = f"dose-response after {summary['steps']} steps ({summary['seconds']:.0f}s)"
    console.print(tier_table(summary["tiers"], title=title))
    if summary["membership"]:
        t = Table(
            title="membership: can an attacker tell members from their controls? (AUC 0.5: no; 1.0: always)",
            title_justify="left",
        )
        for col in ("pair", "signal", "AUC", "TPR at 1% FPR [95% CI]"):
            t.add_column(col, justify="left" if col in ("pair", "signal") else "right")
        for row in summary["membership"]:
            ci = row["tpr_1pct_ci"]
            tpr = (
                "refused: < 100 controls"
                if ci is None
                else f"{row['tpr_1pct']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
            )
            t.add_row(row["pair"], row["signal"], f"{row['auc']:.2f}", tpr)
        console.print(t)
    if summary["kinds"]:
        t = Table(
            title="kinds of memorization (recollection: rare text recalled, the privacy-relevant kind): probes, "
            "and in brackets the entropy jump across the boundary in nats (< 0: surer after the prefix than in it)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        columns = {"recited": "recitation", "reconstr.": "reconstruction", "recollect.": "recollection"}
        for col in ("group", "memorized", *columns, "the rest"):
            left = col == "group"
            t.add_column(col, justify="left" if left else "right", no_wrap=True, min_width=14 if left else 9)

        def cell(count: int, jump: float | None) -> str:
            return f"{count}" + ("" if jump is None else f" ({jump:+.2f})")

        for group, row in summary["kinds"].items():
            t.add_row(
                group,
                f"{row['memorized']}/{row['n']}",
                *(cell(row[name], row[f"boundary_jump_{name}"]) for name in columns.values()),
                cell(row["n"] - row["memorized"], row["boundary_jump_unmemorized"]),
            )
        console.print(t)
    out = summary["out"]
    rel = os.path.relpath(out) if not os.path.relpath(out).startswith("..") else out
    console.print(
        f"\nHistory:     {summary['history']}\n"
        f"Canaries:    {summary['manifest']}  (holds the secrets; mode 0600)\n"
        f"TensorBoard: tensorboard --logdir {rel}   (the trainer's run and memwatch's side by side)\n"
        f"Report:      memwatch report {rel}   (--format json|csv|html for tools and browsers)\n"
    )
    sys.stdout.flush()
