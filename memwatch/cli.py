"""The `memwatch` command line: demo, report, ... (argparse + rich; torch is imported only by the commands)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    run_demo(
        DemoSettings(steps=args.steps, out=args.out, every=args.every, seed=args.seed, live=not args.no_live)
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from .analysis import History, report_dict

    with History(args.path) as history:
        report = report_dict(history)
    if args.format == "json":
        json.dump(report, sys.stdout, indent=1, allow_nan=False, default=str)
        sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memwatch",
        description="Training-time memorization monitor for language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train a tiny GPT-2 on Python's standard library with canaries, watched live"
    )
    demo.add_argument(
        "--steps", type=int, default=800, help="training steps (default: 800, about 3 minutes on 2 CPU cores)"
    )
    demo.add_argument("--out", default="memwatch-demo", help="output directory (default: ./memwatch-demo)")
    demo.add_argument("--every", type=int, default=100, help="evaluate every N steps (default: 100)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-live", action="store_true", help="print tables instead of a live display")
    demo.set_defaults(func=_demo)

    report = sub.add_parser(
        "report", help="summarize a history: groups over steps, transitions, probe timelines"
    )
    report.add_argument(
        "path", help="a history.sqlite file, or a training output directory holding memwatch/"
    )
    report.add_argument("--format", choices=["json"], default="json", help="output format (default: json)")
    report.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .history import HistoryError

    try:
        return int(args.func(args) or 0)
    except HistoryError as exc:
        print(f"memwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
