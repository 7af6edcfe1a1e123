"""Lightning integration: a Callback that adapts memwatch.Monitor (lightning is imported here only)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            "memwatch.integrations.lightning needs Lightning: pip install 'memwatch[lightning]' (or lightning)"
        ) from exc

from memwatch import Monitor, MonitorConfig, SetupError

__all__ = ["MemWatchLightningCallback", "tracker_targets"]


def find_causal_lm(pl_module: Any, attr: str | None = None) -> Any:
    """The Hugging Face causal LM inside a LightningModule: `attr` if given, else the first submodule that has a
    config and can generate (e.g. `self.model = AutoModelForCausalLM...`)."""
    if attr is not None:
        return getattr(pl_module, attr)
    for mod in [pl_module, *pl_module.modules()]:
        can_generate = getattr(mod, "can_generate", None)
        if getattr(mod, "config", None) is not None and callable(can_generate) and can_generate():
            return mod
    raise SetupError(
        f"memwatch found no Hugging Face causal LM inside {type(pl_module).__name__}; pass "
        "MemWatchLightningCallback(..., model_attr='name_of_the_attribute')"
    )


def tracker_targets(trainer: Any) -> list[Any]:
    """The Lightning Trainer's loggers, as memwatch.reporters.trackers targets: W&B (against trainer/global_step,
    as WandbLogger plots) and MLflow (by run id) with alerts and artifacts, any other logger through its own
    log_metrics; TensorBoardLogger left out (memwatch writes its own event files)."""
    from memwatch.reporters.trackers import CallbackTarget, MlflowTarget, WandbTarget

    targets: list[Any] = []
    for logger in getattr(trainer, "loggers", None) or []:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            continue
        if kind == "WandbLogger":
            targets.append(WandbTarget(logger.experiment, step_key="trainer/global_step"))
        elif kind == "MLFlowLogger":
            targets.append(MlflowTarget(logger.run_id, getattr(logger, "_tracking_uri", None)))
        else:

            def log(metrics: dict[str, float], step: int, logger: Any = logger) -> None:
                logger.log_metrics(metrics, step=step)

            targets.append(CallbackTarget(kind, log))
    return targets


class MemWatchLightningCallback(Callback):
    """Attach memwatch to a Lightning Trainer: ``Trainer(callbacks=[MemWatchLightningCallback(MonitorConfig())])``.

    The training cohort is sampled from the train dataloader's dataset (windows whose suffix receives loss under
    its collate_fn), the held-out cohort from `heldout` or the first validation dataloader. Alert actions: "stop"
    sets trainer.should_stop; "save_checkpoint" writes <default_root_dir>/memwatch/checkpoint-step<N>.ckpt.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        model_attr: str | None = None,
        probes: Any = None,
        heldout: Any = None,
        canaries: Any = None,
        tokenizer: Any = None,
        sinks: Any = (),
    ) -> None:
        super().__init__()
        self.monitor = Monitor(
            config, probes=probes, heldout=heldout, tokenizer=tokenizer, canaries=canaries, sinks=sinks
        )
        self.model_attr = model_attr
        self._pending_state: Mapping[str, Any] | None = None
        self._seen_step: int | None = None

    @property
    def config(self) -> MonitorConfig:
        return self.monitor.config

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        monitor = self.monitor
        model = find_causal_lm(pl_module, self.model_attr)
        loader = trainer.train_dataloader
        val = trainer.val_dataloaders
        if isinstance(val, list | tuple):
            val = val[0] if val else None
        precision = str(getattr(trainer, "precision", ""))
        amp = "bf16" if "bf16" in precision else "fp16" if precision.startswith("16") else None
        from memwatch.reporters.trackers import attach_trackers

        attach_trackers(monitor, lambda: tracker_targets(trainer))
        started = monitor.guarded_setup(
            lambda: monitor.setup(
                model,
                output_dir=trainer.default_root_dir,
                train_data=getattr(loader, "dataset", None),
                eval_data=getattr(val, "dataset", None),
                collator=getattr(loader, "collate_fn", None),
                start_step=trainer.global_step,
                amp_dtype=amp,
            )
        )
        if not started:
            return
        if self._pending_state is not None:
            monitor.load_state_dict(self._pending_state)
            self._pending_state = None
        self._seen_step = trainer.global_step
        if monitor.config.eval_on_start and trainer.global_step not in monitor.evaluated_steps:
            self._apply(trainer, monitor.evaluate(model, trainer.global_step))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # Streamed n-grams (MonitorConfig.ngrams="stream"): every micro-batch the model trains on, on every rank.
        if self.monitor.config.ngrams == "stream" and hasattr(batch, "get") and "input_ids" in batch:
            self.monitor.observe_batch(batch["input_ids"], batch.get("attention_mask"))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # gradient accumulation: not an optimizer step yet
            return
        self._seen_step = step
        try:
            self._apply(trainer, self.monitor.on_step(find_causal_lm(pl_module, self.model_attr), step))
        except Exception as exc:
            self.monitor.contain(exc, f"at step {step}")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        try:
            self.monitor.finish(find_causal_lm(pl_module, self.model_attr), trainer.global_step)
        except Exception as exc:
            self.monitor.contain(exc, "at the end of training")
        self.monitor.print_closing(beside=getattr(trainer, "log_dir", None) or trainer.default_root_dir)

    def _apply(self, trainer: Any, record: Any) -> None:
        if record is None or not record.actions:
            return
        if "save_checkpoint" in record.actions:
            out = self.monitor.output_dir or trainer.default_root_dir
            trainer.save_checkpoint(os.path.join(out, f"checkpoint-step{record.step}.ckpt"))
        if "stop_training" in record.actions:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        # Lightning asks for it (on every rank) while saving a checkpoint: the streamed n-gram index is written too.
        if self.monitor.ready:
            self.monitor.checkpoint(int(self.monitor.last_step or 0))
        # After setup the monitor's own state (it outlives closing at train end); before, what was restored.
        return (
            self.monitor.state_dict() if self.monitor.panel is not None else dict(self._pending_state or {})
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self.monitor.ready:
            self.monitor.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)
