"""Scan speed: 1,000 probes x 5 checkpoints of a tiny model through `memwatch scan`, against the bare work.

    python benchmarks/scan.py            # CPU; add --device cuda on a GPU

Builds 5 checkpoints of the demo's GPT-2 (random weights, saved with save_pretrained) and 1,000 probe windows,
runs the real command (its progress bar is shown), then measures the floor in the same run: loading each
checkpoint and calling memwatch.extract on the same probes, with nothing recorded. Prints both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import memwatch
from memwatch.demo import demo_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.checkpoints):
            model = demo_model(seed=i)
            model.save_pretrained(os.path.join(tmp, "run", f"checkpoint-{(i + 1) * 100}"))
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(0, 256, (args.probes, 64), generator=g)
        probes = os.path.join(tmp, "probes.jsonl")
        with open(probes, "w") as f:
            for r in rows.tolist():
                f.write(json.dumps({"input_ids": r, "group": "train"}) + "\n")
        history = os.path.join(tmp, "scan.sqlite")
        cmd = [
            sys.executable,
            "-m",
            "memwatch.cli",
            "scan",
            os.path.join(tmp, "run"),
            "--probes",
            probes,
            "--history",
            history,
            "--device",
            args.device,
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        scan_s = time.perf_counter() - t0

        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        for i in range(args.checkpoints):
            model = AutoModelForCausalLM.from_pretrained(
                os.path.join(tmp, "run", f"checkpoint-{(i + 1) * 100}")
            )
            memwatch.extract(model.to(args.device), rows)
        floor_s = time.perf_counter() - t0
    print(
        f"\nmemwatch scan, {args.probes} probes x {args.checkpoints} checkpoints: {scan_s:.1f}s "
        f"({scan_s / args.checkpoints:.1f}s per checkpoint, including process start-up)"
    )
    print(
        f"floor (load + memwatch.extract, nothing recorded): {floor_s:.1f}s; scan / floor = {scan_s / floor_s:.2f}x"
    )


if __name__ == "__main__":
    main()
