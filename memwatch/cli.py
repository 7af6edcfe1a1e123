"""The `memwatch` command line: demo, scan, sweep, report, compare, export-tb, forecast, recover (argparse; heavy imports on use)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

# Errors raised below the CLI give the Python API's fix (MonitorConfig fields); a command-line user is told the
# flag that does the same. {history} is the command's own flag for where the history goes.
_CLI_WORDS = (
    (r"set MonitorConfig\(suffix_len=(\d+)\)", r"pass --suffix-len \1"),
    (r"MonitorConfig\(prefix_len=(\d+)\)", r"--prefix-len \1"),
    (r"MonitorConfig\.prefix_len / suffix_len", "--prefix-len / --suffix-len"),
    (r"MonitorConfig\.prefix_len", "--prefix-len"),
    (r"MonitorConfig\.suffix_len", "--suffix-len"),
    (r"\(MonitorConfig\(history_path=\.\.\.\) or output_dir=\.\.\.\)", "({history})"),
    (r"\(history_path=\.\.\. or another output_dir\)", "({history} with another path)"),
    (r"(its own|another|a writable) history_path", r"\1 {history}"),
)
_HISTORY_FLAG = {"scan": "--history FILE", "demo": "--out DIR"}


def _in_cli_words(message: str, command: str) -> str:
    """`message` with the Python API's advice replaced by `command`'s flags."""
    for pattern, words in _CLI_WORDS:
        message = re.sub(
            pattern, words.replace("{history}", _HISTORY_FLAG.get(command, "another path")), message
        )
    return message


def _demo(args: argparse.Namespace) -> int:
    from memwatch.demo import DemoSettings, run_demo

    run_demo(
        DemoSettings(steps=args.steps, out=args.out, every=args.every, seed=args.seed, live=not args.no_live)
    )
    return 0


def _scan(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from memwatch.posthoc.scan import scan

    # Under torchrun every process runs this command; rank 0 alone shows progress and the summary (RANK is the
    # launcher's, set before the process group starts).
    main_rank = int(os.environ.get("RANK", "0")) == 0
    console = Console(stderr=True, quiet=not main_rank)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not main_rank,
    )
    with progress:
        ckpt_task = progress.add_task("checkpoints", total=None)
        batch_task = progress.add_task("probes", total=None)

        def on_checkpoint(ckpt, what):
            if progress.tasks[ckpt_task].total is None:
                progress.update(ckpt_task, total=args._n_ckpts)
            if what == "start":
                progress.update(batch_task, completed=0, total=None, description=f"step {ckpt.step}: probes")
            else:
                progress.advance(ckpt_task)
                if what == "skip":
                    progress.console.print(f"step {ckpt.step}: already in the history, skipped")

        def on_batch(done, total):
            progress.update(batch_task, completed=done, total=total)

        from memwatch.posthoc.scan import find_checkpoints

        args._n_ckpts = len(
            find_checkpoints(args.sources, args.revisions.split(",") if args.revisions else None)
        )
        summary = scan(
            args.sources,
            history=args.history,
            probes=args.probes,
            sample_from=args.sample_from,
            samples=args.samples,
            revisions=args.revisions.split(",") if args.revisions else None,
            run_name=args.run_name,
            tokenizer=args.tokenizer,
            base_model=args.base_model,
            device=args.device,
            device_map=args.device_map,
            dtype=args.dtype,
            batch_size=args.batch_size,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
            entropy_window=args.entropy_window,
            mode=args.mode,
            exposure_references=args.exposure_references,
            seed=args.seed,
            on_checkpoint=on_checkpoint,
            on_batch=on_batch,
        )
    shared = {
        "checkpoints": f" on {summary['processes']} processes, each measuring whole checkpoints",
        "probes": f" on {summary['processes']} processes, each measuring a share of the probes",
    }.get(summary["split"], "")
    console.print(
        f"scanned {len(summary['scanned'])} checkpoint(s){shared}, skipped {len(summary['skipped'])} already "
        f"recorded; {summary['probes']} probes -> {summary['history']} (run {summary['run']!r})"
    )
    return 0


def _int_list(text: str) -> list[int]:
    """Comma-separated positive integers (argparse type of --prefix-lens / --suffix-lens)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 8,16,32; got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 8,16,32; got {text!r}")
    return values


def _sweep(args: argparse.Namespace) -> int:
    from memwatch.posthoc.sweep import render_sweep_html, render_sweep_json, render_sweep_text, sweep

    def on_extract(label, k, result):
        print(f"{label}, k={k}: {len(result)} probes extracted", file=sys.stderr)

    result = sweep(
        args.models,
        prefix_lens=args.prefix_lens,
        suffix_lens=args.suffix_lens,
        probes=args.probes,
        sample_from=args.sample_from,
        samples=args.samples,
        seed=args.seed,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        mode=args.mode,
        on_extract=on_extract,
    )
    render = {"json": render_sweep_json, "html": render_sweep_html}.get(args.format, render_sweep_text)
    text = render(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from memwatch.store.runs import History, report_dict

    with History(args.path) as history:
        history.require_runs()
        if args.format == "json":
            text = json.dumps(report_dict(history), indent=1, allow_nan=False, default=str) + "\n"
        elif args.format == "csv":
            from memwatch.posthoc.report import render_csv

            text = render_csv(history)
        elif args.format == "html":
            from memwatch.posthoc.report import render_html

            text = render_html(history, from_step=args.from_step, to_step=args.to_step)
        elif args.format == "pythia-csv":
            from memwatch.posthoc.report import write_pythia_csv

            if not args.out:
                raise _Usage("--format pythia-csv writes one file per checkpoint: give --out DIR")
            paths = write_pythia_csv(history, args.out)
            print(f"wrote {len(paths)} file(s) to {args.out}")
            return 0
        else:
            from memwatch.posthoc.report import render_text

            text = render_text(history, from_step=args.from_step, to_step=args.to_step)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from memwatch.posthoc.report import compare_dict, render_compare
    from memwatch.store.runs import History

    def load(spec: str):
        path, _, run = spec.partition("::")
        with History(path) as h:
            return h.run(int(run) if run.isdigit() else (run or None))

    d = compare_dict(load(args.a), load(args.b))
    sys.stdout.write(
        json.dumps(d, indent=1, default=str) + "\n" if args.format == "json" else render_compare(d)
    )
    return 0


def _export_tb(args: argparse.Namespace) -> int:
    from memwatch.reporters.tensorboard import export_history
    from memwatch.store.runs import History

    with History(args.path) as history:
        history.require_runs()
        paths = export_history(history, args.out)
    for p in paths:
        print(f"wrote {p}")
    print(f"tensorboard --logdir {args.out}")
    return 0


def _forecast(args: argparse.Namespace) -> int:
    import json

    from memwatch.posthoc.forecast import forecast, render_text

    decode = None
    if args.tokenizer:
        if not args.reveal_text:
            raise _Usage("--tokenizer decodes the probes' text, which only --reveal-text shows")
        from transformers import AutoTokenizer

        decode = AutoTokenizer.from_pretrained(args.tokenizer).decode
    run = int(args.run) if args.run and args.run.isdigit() else args.run
    report = forecast(
        args.path,
        run,
        args.horizon,
        test_fraction=args.test_fraction,
        model=args.model,
        reveal_text=args.reveal_text,
        decode=decode,
    )
    if args.format == "json":
        sys.stdout.write(json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")
    else:
        sys.stdout.write(render_text(report))
    return 0


def _recover(args: argparse.Namespace) -> int:
    from memwatch.store.history import recover

    got = recover(args.source, args.target)
    print(
        f"recovered {got['runs']} run(s), {got['evaluations']} evaluation(s) and {got['alerts']} alert(s) into "
        f"{args.target}; lost {got['evaluations_lost']} evaluation(s) and {got['runs_lost']} run(s) that could "
        "not be read"
    )
    return 0


class _Usage(Exception):
    """A command-line mistake the parser could not see."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memwatch", description="Training-time memorization monitor for language models."
    )
    from memwatch import __version__

    parser.add_argument("--version", action="version", version=f"memwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="train a tiny GPT-2 on Python's standard library with canaries, watched live"
    )
    demo.add_argument(
        "--steps", type=int, default=800, help="training steps (default: 800, about 3 minutes on 2 CPU cores)"
    )
    demo.add_argument("--out", default="memwatch-demo", help="output directory (default: ./memwatch-demo)")
    demo.add_argument("--every", type=int, default=100, help="evaluate every N steps (default: 100)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model, data and canaries (default: 0)")
    demo.add_argument("--no-live", action="store_true", help="print tables instead of a live display")
    demo.set_defaults(func=_demo)

    scan = sub.add_parser(
        "scan",
        help="evaluate saved checkpoints into a history (resumable)",
        description="Evaluate a series of checkpoints with the live monitor's engine and history format. "
        "Checkpoints already in the history are skipped. Under torchrun (torchrun --nproc_per_node N -m "
        "memwatch.cli scan ...) the processes split the checkpoints (or, for fewer checkpoints than processes, "
        "each checkpoint's probes) and rank 0 writes the history.",
    )
    scan.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a Trainer output directory (its checkpoint-* folders), model directories, PEFT adapter directories "
        "(adapter_config.json), or one model id with --revisions",
    )
    scan.add_argument("--history", required=True, help="the history file to write (created or continued)")
    scan.add_argument(
        "--probes",
        help="probes: a history (reuses a run's panel), a canary manifest, or JSONL lines "
        '{"text": ...} / {"input_ids": [...]} with optional "group" and "id"',
    )
    scan.add_argument("--sample-from", help="sample training windows from a dataset file (.jsonl or text)")
    scan.add_argument(
        "--samples", type=int, default=512, help="windows to sample with --sample-from (default: 512)"
    )
    scan.add_argument("--revisions", help="comma-separated revisions of one model id, e.g. step1000,step2000")
    scan.add_argument("--run-name", help="the run's name in the history (default: the first source's name)")
    scan.add_argument("--tokenizer", help="tokenizer for text probes (default: the first checkpoint's)")
    scan.add_argument(
        "--base-model",
        metavar="PATH",
        help="the base model of PEFT adapter checkpoints (default: their adapter_config.json's "
        "base_model_name_or_path)",
    )
    scan.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:1, ... (default: cpu; under torchrun 'cuda' is each process's own GPU)",
    )
    scan.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="place each model over the GPUs, then the CPU, with accelerate (for models larger than one "
        "device; replaces --device; under torchrun each process gets its share of the GPUs)",
    )
    scan.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    scan.add_argument("--batch-size", type=int, help="rows per forward (default: from a memory budget)")
    same = "default: the --probes history's own (a canary manifest: its lengths), else %s"
    scan.add_argument("--prefix-len", type=int, help=same % 32)
    scan.add_argument("--suffix-len", type=int, help=same % 32)
    scan.add_argument("--entropy-window", type=int, help=same % "min(16, prefix-len - 1)")
    scan.add_argument("--mode", default="full", choices=["full", "exact"])
    scan.add_argument("--exposure-references", type=int, default=1000)
    scan.add_argument("--seed", type=int, default=0, help="seed of --sample-from's windows (default: 0)")
    scan.set_defaults(func=_scan)

    sw = sub.add_parser(
        "sweep",
        help="extraction rate against prefix length k, continuation length m and model size",
        description="Extraction rates of one probe panel for every prefix length, continuation length and model, "
        "with one extraction per model and prefix length (greedy at the largest m answers every smaller m). The "
        "continuation starts at token max(k) of every probe, so all cells score the same continuations; probes "
        "need max(k) + max(m) tokens.",
    )
    sw.add_argument(
        "models", nargs="+", metavar="MODEL", help="model directories or hub ids (e.g. a family's sizes)"
    )
    sw.add_argument(
        "--prefix-lens", type=_int_list, default=[32], help="comma-separated k values (default: 32)"
    )
    sw.add_argument(
        "--suffix-lens", type=_int_list, default=[32], help="comma-separated m values (default: 32)"
    )
    sw.add_argument("--probes", help='a history (a run\'s panel) or JSONL lines {"text"} / {"input_ids"}')
    sw.add_argument("--sample-from", help="sample training windows from a dataset file (.jsonl or text)")
    sw.add_argument(
        "--samples", type=int, default=512, help="windows to sample with --sample-from (default: 512)"
    )
    sw.add_argument("--seed", type=int, default=0, help="seed of --sample-from's windows (default: 0)")
    sw.add_argument("--tokenizer", help="tokenizer for text probes (default: the first model's)")
    sw.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    sw.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    sw.add_argument("--batch-size", type=int, help="rows per forward (default: from a memory budget)")
    sw.add_argument(
        "--mode",
        default="full",
        choices=["full", "exact"],
        help="full (default; match ratios too) or exact (one teacher-forced pass per k; exactness only)",
    )
    sw.add_argument("--format", choices=["text", "json", "html"], default="text")
    sw.add_argument("--out", help="write to this file instead of standard output")
    sw.set_defaults(func=_sweep)

    report = sub.add_parser(
        "report", help="summarize a history: groups over steps, transitions, timelines, canaries"
    )
    report.add_argument(
        "path", help="a history.sqlite file, or a training output directory holding memwatch/"
    )
    report.add_argument(
        "--format",
        choices=["text", "json", "csv", "html", "pythia-csv"],
        default="text",
        help="text (default), json, csv (per probe and step), html (one self-contained file), "
        "pythia-csv (index,score per checkpoint; needs --out DIR)",
    )
    report.add_argument("--from-step", type=int, help="transition matrix from this step (default: the first)")
    report.add_argument("--to-step", type=int, help="... to this step (default: the last)")
    report.add_argument(
        "--out", help="write to this file (a directory for pythia-csv) instead of standard output"
    )
    report.set_defaults(func=_report)

    compare = sub.add_parser("compare", help="two runs or histories side by side (e.g. deduplicated vs not)")
    compare.add_argument("a", help="a history or output directory, optionally PATH::RUN (name or id)")
    compare.add_argument("b", help="the other one")
    compare.add_argument("--format", choices=["text", "json"], default="text")
    compare.set_defaults(func=_compare)

    export = sub.add_parser(
        "export-tb", help="write a history as TensorBoard event files (the live monitor's tags)"
    )
    export.add_argument("path", help="a history file or output directory")
    export.add_argument("--out", required=True, help="TensorBoard log directory to write")
    export.set_defaults(func=_export_tb)

    fc = sub.add_parser(
        "forecast",
        help="which probes will be memorized within E evaluations: a model trained on the run's earlier "
        "evaluations, tested on its later ones against naive baselines",
        description="Forecast memorization from a history: a model trained on the run's earlier evaluations and "
        "tested on its later ones (a time split: no test label is seen in training), against the baselines 'match "
        "ratio above t' and 'NLL slope below s' (thresholds chosen on the training period), then the probes the "
        "model forecasts to be memorized within E evaluations of the last one. Probes are named by id, group and "
        "tier; their text only with --reveal-text.",
    )
    fc.add_argument("path", help="a history file or output directory")
    fc.add_argument("--run", help="a run's name or id (default: the latest)")
    fc.add_argument("--horizon", type=int, default=3, help="E: evaluations ahead (default: 3)")
    fc.add_argument(
        "--test-fraction",
        type=float,
        default=0.3,
        help="share of the labelled evaluations, the latest, to test on (default: 0.3)",
    )
    fc.add_argument(
        "--model",
        choices=["logistic", "boosting"],
        default="logistic",
        help="logistic regression (default; few positives) or gradient boosting (long runs)",
    )
    fc.add_argument("--format", choices=["text", "json"], default="text")
    fc.add_argument(
        "--reveal-text",
        action="store_true",
        help="show the flagged probes' prefix and suffix (token ids, or decoded with --tokenizer)",
    )
    fc.add_argument("--tokenizer", help="with --reveal-text: decode with this tokenizer (a path or hub id)")
    fc.set_defaults(func=_forecast)

    rec = sub.add_parser(
        "recover",
        help="copy the readable runs of a damaged history into a new file",
        description="Copy every run, panel, evaluation and alert that can still be read from a damaged history into "
        "a new history. The damaged file is only read.",
    )
    rec.add_argument("source", help="the damaged history file")
    rec.add_argument("target", help="the new history file to write (must not exist)")
    rec.set_defaults(func=_recover)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    import sqlite3

    from memwatch.store.history import HistoryError

    errors: tuple[type[BaseException], ...] = (
        HistoryError,
        _Usage,
        FileNotFoundError,
        IsADirectoryError,
        PermissionError,
        sqlite3.DatabaseError,
    )
    try:
        from memwatch.posthoc.scan import ScanError

        errors += (ScanError,)
        return int(args.func(args) or 0)
    except errors as exc:
        print(f"memwatch {args.command}: {_in_cli_words(str(exc), args.command)}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a step the run does not have
        print(f"memwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
