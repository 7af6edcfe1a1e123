"""Scan scale-out: N checkpoints through `memwatch scan` in one process and under torchrun, same machine, one run.

    python benchmarks/scan_parallel.py                      # 8 checkpoints, 1 process against 2 (CPU, gloo)
    python benchmarks/scan_parallel.py --processes 4 --checkpoints 16

Builds N checkpoints of the demo's GPT-2 (random weights, saved with save_pretrained, as a Trainer's checkpoint-*
folders) and a probe panel, then times the real command, start-up included:
  1. `python -m memwatch.cli scan ...`, one process with one thread;
  2. `python -m torch.distributed.run --nproc_per_node P -m memwatch.cli scan ...`, P processes with one thread
     each (torchrun's default): each process measures whole checkpoints and rank 0 writes the history;
  3. with --threads-too, one process with P threads: what the same cores give without torchrun (on a shared
     machine threads that wait for a busy core spin, so this one can take far longer than 1).
Prints the wall times, the ratio 2 / 1 (the goal is about 1 / P) and checks that the histories hold the same numbers.
Each command is then run once more on its finished history (every checkpoint skipped): the fixed cost of starting
the processes, importing, loading one model and opening the history, which the ratio of the rest leaves out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from memwatch.demo import demo_model
from memwatch.store.runs import History


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--probes", type=int, default=1024)
    ap.add_argument("--port", type=int, default=29513, help="torchrun's rendezvous port")
    ap.add_argument("--threads-too", action="store_true", help="also time one process with P threads")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        for i in range(args.checkpoints):
            demo_model(seed=i).save_pretrained(os.path.join(run, f"checkpoint-{(i + 1) * 100}"))
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(0, 256, (args.probes, 64), generator=g)
        probes = os.path.join(tmp, "probes.jsonl")
        with open(probes, "w") as f:
            for r in rows.tolist():
                f.write(json.dumps({"input_ids": r, "group": "train"}) + "\n")

        def scan(history: str) -> list[str]:
            return ["-m", "memwatch.cli", "scan", run, "--probes", probes, "--history", history]

        one = os.path.join(tmp, "one.sqlite")
        many = os.path.join(tmp, "many.sqlite")
        threads = os.path.join(tmp, "threads.sqlite")
        one_s = timed([sys.executable, *scan(one)], threads=1)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes)]
        many_s = timed([*torchrun, "--master_port", str(args.port), *scan(many)], threads=1)
        one_fixed = timed([sys.executable, *scan(one)], threads=1)
        many_fixed = timed([*torchrun, "--master_port", str(args.port), *scan(many)], threads=1)
        threads_s = (
            timed([sys.executable, *scan(threads)], threads=args.processes) if args.threads_too else None
        )
        with History(one) as a, History(many) as b:
            x, y = a.run(), b.run()
        same = (
            x.steps.tolist() == y.steps.tolist()
            and np.array_equal(x.generated, y.generated)
            and np.allclose(x.suffix_nll, y.suffix_nll, atol=1e-5)
            and np.allclose(x.entropy, y.entropy, atol=1e-5)
        )
    n, p = args.checkpoints, args.processes
    print(f"\nmemwatch scan, {args.probes} probes x {n} checkpoints (wall time, process start-up included):")
    print(f"  1 process, 1 thread:                 {one_s:6.1f}s")
    print(
        f"  {p} processes (torchrun), 1 thread each: {many_s:6.1f}s   ratio {many_s / one_s:.2f} (goal ~{1 / p:.2f})"
    )
    work_one, work_many = one_s - one_fixed, many_s - many_fixed
    print(
        f"  without the fixed start-up ({one_fixed:.1f}s and {many_fixed:.1f}s, timed by a rerun that skips every "
        f"checkpoint): {work_one:.1f}s against {work_many:.1f}s, ratio {work_many / work_one:.2f}"
    )
    if threads_s is not None:
        print(f"  1 process, {p} threads:                {threads_s:6.1f}s   ratio {threads_s / one_s:.2f}")
    print(f"  the {p}-process history equals the 1-process one: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
