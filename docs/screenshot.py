"""Render a history's HTML report in headless Chromium, check it shows its tables, and save a screenshot.

    python docs/screenshot.py memwatch-demo            # after `memwatch demo`; writes docs/report.png

Needs a Chromium binary (Debian: apt-get install chromium). Exits non-zero if the rendered page does not hold the
report's tables and charts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from memwatch import History
from memwatch.posthoc.report import render_html

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("history", help="a history file or output directory")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.png"))
    ap.add_argument(
        "--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    )
    args = ap.parse_args()
    with History(args.history) as h:
        page = render_html(h)
    with tempfile.TemporaryDirectory() as tmp:
        html_path = os.path.join(tmp, "report.html")
        with open(html_path, "w", encoding="utf-8") as f:
            f.write(page)
        url = "file://" + html_path
        profile = ["--user-data-dir=" + os.path.join(tmp, "profile")]
        dom = subprocess.run(
            [args.chromium, *FLAGS, *profile, "--dump-dom", url], capture_output=True, text=True, timeout=120
        ).stdout
        wanted = ["Groups over steps", "Probe timelines", "<svg", "extraction rate by group"]
        missing = [w for w in wanted if w not in dom]
        if missing:
            print(f"the rendered page lacks {missing}", file=sys.stderr)
            return 1
        subprocess.run(
            [args.chromium, *FLAGS, *profile, "--window-size=1240,1500", f"--screenshot={args.out}", url],
            capture_output=True,
            timeout=120,
            check=True,
        )
    print(
        f"rendered in Chromium: {len(dom)} bytes of DOM with {dom.count('<table')} tables and "
        f"{dom.count('<svg')} charts; screenshot {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
