"""Hugging Face Trainer integration: MemWatchCallback, a thin adapter over memwatch.Monitor."""

from __future__ import annotations

import sys
from typing import Any

from transformers import TrainerCallback

from memwatch import Monitor, MonitorConfig

__all__ = ["MemWatchCallback"]


def _find_trainer() -> Any:
    """The Trainer running this callback, found on the call stack (callbacks are not handed the Trainer itself).

    Used only to read its eval_dataset and data_collator when the dataloader does not carry them.
    """
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover
        return None
    frame = sys._getframe(1)
    for _ in range(40):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def tracker_targets(trainer: Any) -> list[Any]:
    """The trackers the Trainer reports to (`report_to`), as memwatch.reporters.trackers targets. W&B and MLflow are
    written directly in the runs the Trainer's callbacks opened (W&B against the Trainer's x-axis train/global_step,
    without the "train/" prefix its callback adds; MLflow by run id, since its callback may end the run before the
    final evaluation); the other integrations through their own on_log. TensorBoard is left out: memwatch writes
    its own event files beside the Trainer's."""
    from transformers.integrations import integration_utils as hf

    from memwatch.reporters.trackers import CallbackTarget, MlflowTarget, WandbTarget

    integrations = tuple(getattr(hf, "INTEGRATION_TO_CALLBACK", {}).values())
    targets: list[Any] = []
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, hf.TensorBoardCallback) or not isinstance(cb, integrations):
            continue
        if isinstance(cb, hf.WandbCallback):
            import wandb

            if wandb.run is not None:
                targets.append(WandbTarget(wandb.run, step_key="train/global_step"))
        elif isinstance(cb, hf.MLflowCallback):
            import mlflow

            active = mlflow.active_run()
            if active is not None:
                targets.append(MlflowTarget(active.info.run_id, mlflow.get_tracking_uri()))
        else:

            def on_log(metrics: dict[str, float], step: int, cb: Any = cb) -> None:
                cb.on_log(trainer.args, trainer.state, trainer.control, model=trainer.model, logs=metrics)

            targets.append(CallbackTarget(type(cb).__name__, on_log))
    return targets


def _is_tokenizer(obj: Any) -> bool:
    return obj is not None and callable(obj) and hasattr(obj, "decode")


class MemWatchCallback(TrainerCallback):
    """Attach memwatch to a `transformers.Trainer`:

        Trainer(..., callbacks=[MemWatchCallback(MonitorConfig(every_n_steps=50))])

    The model and tokenizer come from the Trainer; the training cohort is sampled from the dataset its
    dataloader actually uses (windows whose suffix receives loss under its collator), the held-out cohort from
    `heldout` or the Trainer's eval_dataset. The Trainer's log history, evaluation and TensorBoard writer are
    never touched: memwatch writes to <output_dir>/memwatch, and forwards a short set of numbers to the trackers
    in `report_to` (MonitorConfig.trackers).
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        probes: Any = None,
        heldout: Any = None,
        canaries: Any = None,
        tokenizer: Any = None,
        sinks: Any = (),
    ) -> None:
        self.monitor = Monitor(
            config, probes=probes, heldout=heldout, tokenizer=tokenizer, canaries=canaries, sinks=sinks
        )

    @property
    def config(self) -> MonitorConfig:
        return self.monitor.config

    def on_train_begin(
        self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs
    ):
        monitor = self.monitor
        if not monitor.guarded_setup(
            lambda: self._setup(args, state, model, processing_class, train_dataloader)
        ):
            return control
        # A baseline at train begin, unless this step is already recorded (a resumed run).
        if self.config.eval_on_start and state.global_step not in monitor.evaluated_steps:
            self._apply(monitor.evaluate(model, state.global_step), control)
        return control

    def _setup(self, args, state, model, processing_class, train_dataloader) -> None:
        trainer = _find_trainer()
        train_data = getattr(train_dataloader, "dataset", None)
        collator = getattr(train_dataloader, "collate_fn", None)
        eval_data = None
        if trainer is not None:
            if train_data is None:
                train_data = trainer.train_dataset
            if collator is None:
                collator = trainer.data_collator
            eval_data = trainer.eval_dataset
            if isinstance(eval_data, dict):  # several eval sets: the first is the held-out cohort
                eval_data = next(iter(eval_data.values()), None)
        tokenizer = (
            processing_class
            if _is_tokenizer(processing_class)
            else getattr(processing_class, "tokenizer", None)
        )
        amp = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else None
        config = getattr(model, "config", None)
        if trainer is not None:
            # Where the loss already is: the trackers the Trainer reports to, opened by their callbacks' own
            # on_train_begin (which run before this one: the Trainer puts report_to's callbacks first).
            from memwatch.reporters.trackers import attach_trackers

            attach_trackers(self.monitor, lambda: tracker_targets(trainer))
        self.monitor.setup(
            model,
            output_dir=args.output_dir,
            train_data=train_data,
            eval_data=eval_data,
            collator=collator,
            tokenizer=tokenizer,
            start_step=state.global_step,
            amp_dtype=amp,
            run_name=getattr(args, "run_name", None),
            model_name=getattr(config, "_name_or_path", None) or type(model).__name__,
        )
        if trainer is not None and self.config.ngrams == "stream":
            self._observe_batches(trainer)

    def _observe_batches(self, trainer: Any) -> None:
        """Streamed n-grams: each micro-batch's input_ids (attention mask respected) reach the index as the
        Trainer trains on it, on every rank. training_step is shadowed on this Trainer object only (the class is
        untouched) and restored at train end; the batch itself is passed on unchanged."""
        self._restore_training_step()  # a Trainer trained again (a failed train() never reached on_train_end)
        before = vars(trainer).get("training_step")  # someone else's per-instance patch, kept and restored
        while getattr(before, "__memwatch__", False):  # ours, left by a train() that raised: never wrap twice
            before = before.__memwatch_before__
        original = before if before is not None else trainer.training_step
        monitor = self.monitor

        def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if hasattr(inputs, "get") and "input_ids" in inputs:  # a dict or a BatchEncoding
                monitor.observe_batch(inputs["input_ids"], inputs.get("attention_mask"))
            return original(model, inputs, *args, **kwargs)

        training_step.__memwatch__ = True  # type: ignore[attr-defined]
        training_step.__memwatch_before__ = before  # type: ignore[attr-defined]
        trainer.training_step = training_step
        self._shadowed = trainer

    def _restore_training_step(self) -> None:
        """The Trainer's training_step as found: the class's method, or the per-instance one that was there."""
        trainer = getattr(self, "_shadowed", None)
        self._shadowed = None
        current = vars(trainer).get("training_step") if trainer is not None else None
        if current is None or not getattr(current, "__memwatch__", False):
            return
        before = current.__memwatch_before__
        if before is None:
            del trainer.training_step
        else:
            trainer.training_step = before

    @staticmethod
    def _apply(record: Any, control: Any) -> None:
        """Alert actions through the Trainer's own control flags: it saves and stops at this step."""
        if record is None or not record.actions:
            return
        if "save_checkpoint" in record.actions:
            control.should_save = True
        if "stop_training" in record.actions:
            control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        try:
            last = bool(state.max_steps) and state.global_step >= state.max_steps
            self._apply(self.monitor.on_step(model, state.global_step, last=last), control)
        except Exception as exc:
            self.monitor.contain(exc, f"at step {state.global_step}")
        return control

    def on_save(self, args, state, control, **kwargs):
        self.monitor.checkpoint(state.global_step)  # the streamed n-gram index written with the checkpoint
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        try:
            self.monitor.finish(model, state.global_step)
        except Exception as exc:
            self.monitor.contain(exc, "at the end of training")
        self.monitor.print_closing(beside=getattr(args, "logging_dir", None) or args.output_dir)
        self._restore_training_step()  # the Trainer as found
        return control
