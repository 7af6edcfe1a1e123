"""Post-hoc: scan a Trainer run's saved checkpoints and read the result, from Python.

    python examples/trainer_callback.py --steps 300 --out runs/example     # or any run with checkpoint-* folders
    python examples/scan_checkpoints.py runs/example

The same as `memwatch scan runs/example --probes runs/example/memwatch/history.sqlite --history scan.sqlite`
followed by `memwatch report scan.sqlite`: the checkpoints are evaluated on the live run's own probe panel, so the
scanned history can be compared with what the live monitor recorded.
"""

from __future__ import annotations

import argparse
import os

from memwatch import History
from memwatch.posthoc.scan import scan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a Trainer output directory with checkpoint-* folders")
    ap.add_argument("--history", default=None, help="where to write (default: <run>/memwatch/scan.sqlite)")
    args = ap.parse_args()
    history = args.history or os.path.join(args.run, "memwatch", "scan.sqlite")
    live = os.path.join(args.run, "memwatch", "history.sqlite")
    summary = scan(
        [args.run],
        history=history,
        probes=live if os.path.exists(live) else None,
        prefix_len=32,
        suffix_len=16,
        on_checkpoint=lambda ckpt, what: print(f"step {ckpt.step}: {what}"),
    )
    print(summary)
    with History(history) as h:
        run = h.run()
        for row in run.group_series():
            print(
                f"step {row['step']:>6} {row['group']:>15}: {row['extracted']}/{row['n']} extracted, "
                f"match {row['mean_match_ratio']:.2f}"
            )


if __name__ == "__main__":
    main()
