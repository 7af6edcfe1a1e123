"""A Trainer run for tests/test_resume.py: `full`, `kill` (SIGKILL itself at step 55) or `resume` from checkpoint-40.

python tests/resume_worker.py MODE OUT [--no-memwatch] [--restore-callback-states]
"""

from __future__ import annotations

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _models import VOCAB, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from memwatch import AlertConfig, MemWatchCallback, MonitorConfig


class KillAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    torch.set_num_threads(1)
    mode, out = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    # Few rows, seen every step, so that probes are memorized before the checkpoint and transitions happen.
    rows = [
        {"input_ids": r.tolist(), "labels": r.tolist()} for r in torch.randint(0, VOCAB, (8, 48), generator=g)
    ]
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=8,
        max_steps=60,
        learning_rate=8e-3,
        logging_steps=10,
        save_strategy="steps",
        save_steps=20,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        restore_callback_states_from_checkpoint="--restore-callback-states" in sys.argv,
    )
    callbacks: list = []
    if "--no-memwatch" not in sys.argv:
        callbacks.append(
            MemWatchCallback(
                MonitorConfig(
                    every_n_steps=10,
                    prefix_len=16,
                    suffix_len=16,
                    console=False,
                    run_name="resume-test",
                    # rules that fire before and after the checkpoint, with cooldowns spanning it
                    alerts=AlertConfig(extraction_rate={"train": 0.05}, spike_min_evals=2, cooldown=2),
                )
            )
        )
    if mode == "kill":
        callbacks.append(KillAt(55))
    trainer = Trainer(model=tiny_model("gpt2"), args=args, train_dataset=rows, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-40") if mode == "resume" else None)
    if (
        callbacks
        and isinstance(callbacks[0], MemWatchCallback)
        and callbacks[0].monitor.alert_engine is not None
    ):
        import json

        with open(
            os.path.join(out, "alert_state.json"), "w"
        ) as f:  # rules' baselines, armed flags, cooldowns
            json.dump(callbacks[0].monitor.alert_engine.state_dict(), f, sort_keys=True)


if __name__ == "__main__":
    main()
