"""Screenshots for the docs in headless Chromium: the HTML report and TensorBoard's scalars, custom scalars, images.

    memwatch demo --out memwatch-demo --no-live     # several minutes on 2 CPU cores
    python docs/screenshot.py memwatch-demo         # writes docs/report.png and docs/tb-*.png

The report is rendered from the directory's history, checked to hold its tables and charts, and saved as
report.png. Then `tensorboard --logdir DIR` is started on a free local port, the script waits until it has loaded
the run's scalars, custom-scalars layout and images, saves each page (tb-scalars.png, tb-custom-scalars.png,
tb-images.png) and stops it. Not run in CI: it needs a Chromium binary (Debian: apt-get install chromium).
Exits non-zero when a page cannot be shown (no report tables, TensorBoard not answering or missing a dashboard).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from memwatch import History
from memwatch.posthoc.report import render_html

DOCS = os.path.dirname(os.path.abspath(__file__))

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

# TensorBoard page -> (file name, the plugin that must be active for the page to show anything). Smoothing at 0
# (the dashboards start at 0.6, which draws a 0 -> 1 jump as a ramp), as the closing summary's link opens them.
TB_PAGES = {
    "scalars&_smoothingWeight=0": ("tb-scalars.png", "scalars"),
    "custom_scalars&_smoothingWeight=0": ("tb-custom-scalars.png", "custom_scalars"),
    "images": ("tb-images.png", "images"),
}


def chromium_screenshot(
    chromium: str, url: str, out: str, size: str, profile: str, budget_ms: int = 0
) -> None:
    """Save `url` as a PNG. budget_ms: virtual time for the page's scripts to load and draw (TensorBoard's charts
    come from JavaScript and requests after the page loads; without it the shot shows an empty frame)."""
    budget = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    subprocess.run(
        [
            chromium,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            *budget,
            f"--screenshot={out}",
            url,
        ],
        capture_output=True,
        timeout=180,
        check=True,
    )


def report_shot(history: str, chromium: str, out: str, tmp: str) -> str:
    """The HTML report in Chromium: checked to hold its tables and charts, then saved as `out`."""
    with History(history) as h:
        page = render_html(h)
    html_path = os.path.join(tmp, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    url = "file://" + html_path
    profile = os.path.join(tmp, "profile-report")
    dom = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    wanted = ["Groups over steps", "Probe timelines", "<svg", "extraction rate by group"]
    missing = [w for w in wanted if w not in dom]
    if missing:
        raise RuntimeError(f"the rendered report lacks {missing}")
    chromium_screenshot(chromium, url, out, "1400,1500", profile)  # the groups table is ~1300 px wide
    return f"report: {len(dom)} bytes of DOM with {dom.count('<table')} tables and {dom.count('<svg')} charts"


def free_port() -> int:
    """A port nothing listens on now (the OS picks it); TensorBoard binds it a moment later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_plugins(base: str, plugins: list[str], proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Until TensorBoard answers and reports every plugin in `plugins` active, i.e. it has read the event files
    that hold their data (it loads them in the background after it starts listening)."""
    deadline = time.monotonic() + timeout
    listing: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/data/plugins_listing", timeout=5) as r:
                listing = json.load(r)
            if all(listing.get(p, {}).get("enabled") for p in plugins):
                return
        except OSError:
            pass  # not listening yet
        time.sleep(1.0)
    inactive = [p for p in plugins if not listing.get(p, {}).get("enabled")]
    raise RuntimeError(f"tensorboard at {base} did not show {inactive or plugins} within {timeout:.0f}s")


def tensorboard_shots(
    logdir: str, chromium: str, tensorboard: list[str], out_dir: str, tmp: str
) -> list[str]:
    """Start TensorBoard on `logdir`, save each of TB_PAGES, stop it. Returns the files written."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tmp, "tensorboard.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*tensorboard, "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    written = []
    try:
        try:
            wait_for_plugins(base, [plugin for _file, plugin in TB_PAGES.values()], proc)
        except RuntimeError:
            with open(log_path) as f:
                sys.stderr.write(f.read()[-4000:])
            raise
        for page, (name, _plugin) in TB_PAGES.items():
            out = os.path.join(out_dir, name)
            profile = os.path.join(
                tmp, f"profile-{page}"
            )  # a fresh profile: no settings carried between pages
            chromium_screenshot(chromium, f"{base}/#{page}", out, "1400,1000", profile, budget_ms=15000)
            written.append(out)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "directory", help="a demo (or training) output directory; a history file for the report only"
    )
    ap.add_argument("--out-dir", default=DOCS, help="where the PNGs go (default: docs/)")
    ap.add_argument(
        "--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    )
    ap.add_argument("--no-tensorboard", action="store_true", help="the report's screenshot only")
    args = ap.parse_args()
    # This interpreter's TensorBoard (a memwatch dependency), not whichever `tensorboard` is first on PATH.
    tensorboard = [sys.executable, "-m", "tensorboard.main"]
    os.makedirs(args.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = os.path.join(args.out_dir, "report.png")
            print(f"{report_shot(args.directory, args.chromium, report, tmp)}; saved {report}")
            if not args.no_tensorboard and os.path.isdir(args.directory):
                # The output directory, not memwatch/tb: TensorBoard shows the trainer's run next to memwatch's.
                for path in tensorboard_shots(args.directory, args.chromium, tensorboard, args.out_dir, tmp):
                    print(f"saved {path}")
        except (RuntimeError, subprocess.SubprocessError) as e:
            print(f"screenshot failed: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
