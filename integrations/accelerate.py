"""Accelerate integration for custom training loops: a thin adapter over memwatch.Monitor."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from memwatch import EvalRecord, Monitor, MonitorConfig, SetupError

__all__ = ["MemWatch", "tracker_targets"]


def tracker_targets(accelerator: Any) -> list[Any]:
    """The trackers of `accelerator.init_trackers` (log_with=...), as memwatch.reporters.trackers targets: numbers
    through each tracker's own log at the training step (TensorBoard left out: memwatch writes its own event files);
    W&B alerts and artifacts in its run, MLflow tags and artifacts in the active run."""
    from memwatch.reporters.trackers import CallbackTarget, MlflowTarget, WandbTarget

    targets: list[Any] = []
    for tracker in getattr(accelerator, "trackers", None) or []:
        name = getattr(tracker, "name", type(tracker).__name__)
        if name == "tensorboard":
            continue
        if name == "wandb":
            targets.append(WandbTarget(tracker.run))
        elif name == "mlflow":
            import mlflow

            active = mlflow.active_run()
            if active is not None:
                targets.append(MlflowTarget(active.info.run_id, mlflow.get_tracking_uri()))
        else:

            def log(metrics: dict[str, float], step: int, tracker: Any = tracker) -> None:
                tracker.log(metrics, step=step)

            targets.append(CallbackTarget(name, log))
    return targets


class MemWatch:
    """memwatch in a custom Accelerate loop::

        watch = MemWatch(MonitorConfig(every_n_steps=50), train_data=train_dataset, eval_data=eval_dataset)
        accelerator.register_for_checkpointing(watch)      # saved and restored with accelerator.save_state/load_state
        for step, batch in enumerate(loader, start=1):
            ...; optimizer.step()
            record = watch.step(accelerator, model, step)  # on every rank; evaluates when due
            if record is not None and "stop_training" in record.actions:
                break
        watch.finish(accelerator, model, step)

    `step` returns the EvalRecord of an evaluation (its `actions` say what the alerts asked for: "save_checkpoint",
    "stop_training"), else None. Setup happens at the first call (or at `start`); a run resumed with
    `accelerator.load_state` continues its history.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        train_data: Any = None,
        eval_data: Any = None,
        collator: Any = None,
        probes: Any = None,
        heldout: Any = None,
        canaries: Any = None,
        tokenizer: Any = None,
        sinks: Any = (),
        output_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.monitor = Monitor(
            config, probes=probes, heldout=heldout, tokenizer=tokenizer, canaries=canaries, sinks=sinks
        )
        self.train_data = train_data
        self.eval_data = eval_data
        self.collator = collator
        self.output_dir = output_dir
        self._pending_state: Mapping[str, Any] | None = None

    @property
    def config(self) -> MonitorConfig:
        return self.monitor.config

    def start(self, accelerator: Any, model: Any, step: int = 0) -> EvalRecord | None:
        """Build the panel and open the outputs (every rank), then the baseline evaluation if not yet recorded.

        Call it before the loop for a baseline at step 0; otherwise the first `step` call does it. After
        `accelerator.load_state`, the run continues from the step its state was saved at.
        """
        monitor = self.monitor
        if monitor.ready or monitor.disabled:
            return None
        if self._pending_state is not None:
            step = int(self._pending_state.get("step", step))
        out = self.output_dir or getattr(accelerator, "project_dir", None) or "."
        mixed = str(getattr(accelerator, "mixed_precision", "no"))
        from memwatch.reporters.trackers import attach_trackers

        attach_trackers(monitor, lambda: tracker_targets(accelerator))
        started = monitor.guarded_setup(
            lambda: monitor.setup(
                model,
                output_dir=out,
                train_data=self.train_data,
                eval_data=self.eval_data,
                collator=self.collator,
                start_step=step,
                amp_dtype=mixed if mixed in ("bf16", "fp16") else None,
            )
        )
        if not started:
            return None
        if self._pending_state is not None:
            monitor.load_state_dict(self._pending_state)
            self._pending_state = None
        if monitor.config.eval_on_start and step not in monitor.evaluated_steps:
            return monitor.evaluate(model, step)
        return None

    def observe_batch(self, input_ids: Any, attention_mask: Any = None) -> None:
        """Streamed n-grams (MonitorConfig.ngrams="stream"): call with every micro-batch you train on, every rank."""
        self.monitor.observe_batch(input_ids, attention_mask)

    def step(self, accelerator: Any, model: Any, step: int) -> EvalRecord | None:
        """Call after every optimizer step, on every rank."""
        try:
            if not self.monitor.ready:
                first = self.start(accelerator, model, step)
                if first is not None and first.step == step:
                    return first
            return self.monitor.on_step(model, step)
        except SetupError:
            raise
        except Exception as exc:
            self.monitor.contain(exc, f"at step {step}")
            return None

    def finish(self, accelerator: Any, model: Any, step: int) -> EvalRecord | None:
        """End of training: the final evaluation (unless just done), then close the outputs."""
        try:
            return self.monitor.finish(model, step)
        except Exception as exc:
            self.monitor.contain(exc, "at the end of training")
            return None
        finally:
            self.monitor.print_closing(beside=getattr(accelerator, "project_dir", None))

    # accelerator.register_for_checkpointing(watch) calls these
    def state_dict(self) -> dict[str, Any]:
        # accelerator.save_state asks for it on every rank: the streamed n-gram index is written with the checkpoint.
        if self.monitor.ready:
            self.monitor.checkpoint(int(self.monitor.last_step or 0))
        return self.monitor.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.monitor.ready:
            self.monitor.load_state_dict(state)
        else:  # restored before the first step: applied when the monitor starts
            self._pending_state = dict(state)
