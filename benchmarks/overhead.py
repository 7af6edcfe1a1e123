"""Training-time overhead of memwatch at its default cadence, on the demo's model, in one run.

    python benchmarks/overhead.py                 # 2000 steps without, then with MemWatchCallback(MonitorConfig())
    python benchmarks/overhead.py --ngrams stream # the same with the training data's n-grams streamed

Both runs train the same seeded model on the same data; a timing callback placed after memwatch's stamps every
optimizer step, so periodic evaluations count against memwatch. Reported: steady-state training steps/s (from
step --warmup to the end) with and without, and memwatch's own share of that window (the evaluations inside it,
timed by memwatch and read back from its history), which does not depend on how busy a shared machine was
during the two runs; the one-off evaluation at train begin is outside the window.
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


class Stopwatch:
    """Seconds spent inside the wrapped callables (the streamed index's per-batch and per-step work, which happens
    outside the evaluations the history times)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def run(
    steps: int, with_memwatch: bool, out: str, seed: int, device: str = "cpu", ngrams: str = "off"
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
        use_cpu=device == "cpu",
        bf16=device
        != "cpu",  # on a GPU, as people train: bf16 autocast (memwatch follows it, amp_dtype="auto")
        seed=seed,
        disable_tqdm=True,
    )
    clock = StepClock()
    mw = MemWatchCallback(MonitorConfig(console=False, ngrams=ngrams)) if with_memwatch else None
    if mw is not None:
        watch = Stopwatch()
        mw.monitor.observe_batch = watch.wrap(mw.monitor.observe_batch)
        mw.monitor.ngram_feed.end_step = watch.wrap(mw.monitor.ngram_feed.end_step)
        mw.stream_clock = watch
    callbacks = ([mw] if mw else []) + [clock]
    trainer = Trainer(
        model=demo_model(), args=args, train_dataset=train, eval_dataset=held, callbacks=callbacks
    )
    t0 = time.perf_counter()
    trainer.train()
    return clock, mw, time.perf_counter() - t0


def compare(
    steps: int, warmup: int, seed: int, device: str = "cpu", say=print, ngrams: str = "off"
) -> tuple[float, float]:
    """Both runs, one line each through `say`; (memwatch's share of the steady window, steps/s with / without)."""
    rates = {}
    share = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        for label, flag, sub in (
            ("without memwatch", False, "plain"),
            (
                "with memwatch (defaults)" if ngrams == "off" else f"with memwatch (ngrams={ngrams})",
                True,
                "watched",
            ),
        ):
            out = os.path.join(tmp, sub)
            clock, mw, total = run(steps, flag, out, seed, device, ngrams if flag else "off")
            window = clock.stamps[steps] - clock.stamps[warmup]
            rates[label] = (steps - warmup) / window
            line = f"{label:26s} {rates[label]:6.2f} steps/s (steady, steps {warmup}-{steps}), total {total:6.1f}s"
            if mw is not None:
                from memwatch.store.runs import History

                m = mw.monitor
                with History(out) as h:
                    evals = h.store.evals(h.run().run_id)
                inside = [e for e in evals if warmup < e["step"] <= steps]
                spent = sum(e["duration"] or 0.0 for e in inside)
                streamed = mw.stream_clock.seconds  # the whole run's: an upper bound on the window's
                spent += streamed
                share = spent / window
                line += (
                    f"; evaluations at steps {m.evaluated_steps} (interval {m.cadence.interval}, {len(m.panel)} "
                    f"probes); inside the window: {len(inside)}, taking {spent - streamed:.1f}s, plus {streamed:.1f}s "
                    f"streaming batches into the n-gram index = {share:.2%} of it"
                )
            say(line)
    watched = next(label for label in rates if label.startswith("with memwatch"))
    return share, rates[watched] / rates["without memwatch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=20, help="steps excluded from the steady-state rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast, as people train on GPUs)")
    ap.add_argument(
        "--ngrams", default="off", choices=["off", "stream"], help="MonitorConfig.ngrams (default off)"
    )
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    share, ratio = compare(
        args.steps, args.warmup, args.seed, args.device, lambda line: print(line, flush=True), args.ngrams
    )
    print(f"\nmemwatch's share of steady training time at the default cadence: {share:.2%} (goal <= 2%)")
    print(f"steps/s with / without = {ratio:.4f} (two separate runs: the machine's noise included)")


if __name__ == "__main__":
    main()
