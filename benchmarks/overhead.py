"""Training-time overhead of memwatch at its default cadence, on the demo's model, in one run.

    python benchmarks/overhead.py                 # 2000 steps without, then with MemWatchCallback(MonitorConfig())

Both runs train the same seeded model on the same data; a timing callback placed after memwatch's stamps every
optimizer step, so periodic evaluations count against memwatch. Reported: steady-state training steps/s (from
step --warmup to the end) with and without, the overhead, and the one-off evaluations at train begin and end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from memwatch import MemWatchCallback, MonitorConfig
from memwatch.demo import _chunks, demo_model, stdlib_corpus


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps[state.global_step] = time.perf_counter()


def run(
    steps: int, with_memwatch: bool, out: str, seed: int
) -> tuple[StepClock, MemWatchCallback | None, float]:
    train_text, held_text = stdlib_corpus(320_000)
    train = [{"input_ids": r, "labels": r} for r in _chunks(train_text, 128)]
    held = [{"input_ids": r, "labels": r} for r in _chunks(held_text, 128)]
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=2e-3,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    clock = StepClock()
    mw = MemWatchCallback(MonitorConfig(console=False)) if with_memwatch else None
    callbacks = ([mw] if mw else []) + [clock]
    trainer = Trainer(
        model=demo_model(), args=args, train_dataset=train, eval_dataset=held, callbacks=callbacks
    )
    t0 = time.perf_counter()
    trainer.train()
    return clock, mw, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=20, help="steps excluded from the steady-state rate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, flag in (("without memwatch", False), ("with memwatch (defaults)", True)):
            clock, mw, total = run(args.steps, flag, os.path.join(tmp, label[:4]), args.seed)
            window = clock.stamps[args.steps] - clock.stamps[args.warmup]
            rates[label] = (args.steps - args.warmup) / window
            line = f"{label:26s} {rates[label]:6.2f} steps/s (steady, steps {args.warmup}-{args.steps}), total {total:6.1f}s"
            if mw is not None:
                m = mw.monitor
                periodic = [s for s in m.evaluated_steps if args.warmup < s < args.steps]
                line += (
                    f"; evaluations at steps {m.evaluated_steps} (interval {m.cadence.interval}, "
                    f"{len(m.panel)} probes, last took {m.last_record.duration:.2f}s); "
                    f"periodic inside the window: {len(periodic)}"
                )
            print(line, flush=True)
    base, watched = rates["without memwatch"], rates["with memwatch (defaults)"]
    print(
        f"\noverhead at the default cadence: {100 * (1 - watched / base):.2f}% "
        f"(goal <= 2%); steps/s ratio with/without = {watched / base:.4f}"
    )


if __name__ == "__main__":
    main()
