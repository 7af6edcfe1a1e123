"""The reference model: a PEFT model's base (adapters disabled) or a model you name, measured once and cached."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from memwatch.signals.reference import REFERENCED

__all__ = ["Reference", "adapter_switch"]

log = logging.getLogger("memwatch")


def _unwrap(model: Any) -> Any:
    """The model inside DDP / DataParallel / Accelerate wrappers."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def adapter_switch(model: Any) -> Callable[[], contextlib.AbstractContextManager[Any]] | None:
    """A context manager factory that runs `model` as its base (adapters off, then on again), or None when the
    model has no adapters: a peft PeftModel (`disable_adapter()`), or a transformers model with adapters loaded
    through its PEFT integration (`disable_adapters()` / `enable_adapters()`, left alone if already disabled).
    Which parameters are trainable is restored by the caller (peft's re-enabling marks adapters trainable)."""
    inner = _unwrap(model)
    if hasattr(inner, "peft_config") and callable(getattr(inner, "disable_adapter", None)):
        return inner.disable_adapter
    if getattr(inner, "_hf_peft_config_loaded", False) and callable(getattr(inner, "disable_adapters", None)):

        @contextlib.contextmanager
        def disabled() -> Iterator[None]:
            if getattr(inner, "_adapters_disabled", False):  # already the base: nothing to switch
                yield
                return
            inner.disable_adapters()
            try:
                yield
            finally:
                inner.enable_adapters()

        return disabled
    return None


class Reference:
    """What the reference model gives on the panel: measured at the first evaluation, then reused.

    source: "auto" (a PEFT model's base when the trained model has adapters; nothing otherwise), a path or hub name
    of a model with the same tokenizer (loaded once at setup into host memory, moved to the trained model's device
    for its one measurement, then freed), a model object (used where it is, never modified), or None (off). Both
    kinds are frozen during training (LoRA trains the adapters only), so one measurement serves every evaluation; a
    resumed run measures it again at its first evaluation.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.model: Any = None  # the loaded or given reference, until its one measurement
        self.products: dict[str, np.ndarray] | None = None
        self.description: str | None = None
        self._loaded = False  # loaded here (ours to move and free), not given

    def setup(self, model: Any, needed_positions: int) -> str | None:
        """Check and load what will serve as the reference (so a wrong path or tokenizer is said before training);
        its description, or None. Raises SetupError."""
        from memwatch.engine.modeling import inspect_model
        from memwatch.live.setup import SetupError

        source = self.source
        if source is None:
            return None
        if isinstance(source, str) and source == "auto":
            self.description = "the PEFT base model (adapters disabled)" if adapter_switch(model) else None
            return self.description
        live = inspect_model(model)
        if isinstance(source, str | os.PathLike):
            import transformers
            from transformers import AutoModelForCausalLM

            # transformers 4.56 renamed torch_dtype to dtype (and 5.x warns on the old name).
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
            try:  # in host memory until its measurement: the accelerator's memory stays with training
                self.model = AutoModelForCausalLM.from_pretrained(
                    os.fspath(source), **{key: live.param_dtype}
                )
            except (OSError, ValueError) as exc:
                raise SetupError(
                    f"MonitorConfig.reference={os.fspath(source)!r} could not be loaded as a causal LM ({exc}); name "
                    "a local model directory (or hub name) with the trained model's tokenizer, 'auto' or None"
                ) from exc
            self._loaded = True
            self.description = f"the model at {os.fspath(source)}"
        else:
            shared = {id(p) for p in source.parameters()} & {id(p) for p in model.parameters()}
            if shared:
                raise SetupError(
                    f"the reference model shares {len(shared)} parameter tensors with the trained model (e.g. the "
                    "base after peft.get_peft_model, which adds the adapters in place), so it would change with "
                    "training; pass an independent copy, or leave reference='auto' for a PEFT model"
                )
            self.model = source
            self.description = f"the reference model given ({type(source).__name__})"
        self.source = None  # the model itself is held until measured, then released
        ref = inspect_model(self.model)
        if ref.vocab_size != live.vocab_size:
            self.close()
            raise SetupError(
                f"the reference model has a vocabulary of {ref.vocab_size} tokens and the trained model "
                f"{live.vocab_size}: a reference must share the trained model's tokenizer"
            )
        if ref.position_limit is not None and needed_positions > ref.position_limit:
            self.close()
            raise SetupError(
                f"prefix_len + suffix_len = {needed_positions} exceeds the reference model's position limit of "
                f"{ref.position_limit}; name another reference or lower prefix_len / suffix_len"
            )
        return self.description

    def measure(self, model: Any, run: Callable[[Any], Any]) -> dict[str, np.ndarray] | None:
        """The reference products, measured once by `run(reference_model)` -> ExtractionResult, then cached. The
        trained model is left as found: adapters back on, every parameter as trainable as it was."""
        if self.products is not None or self.description is None:
            return self.products
        if self.model is not None:
            reference, self.model = self.model, None
            try:
                if self._loaded:
                    from memwatch.engine.modeling import inspect_model

                    reference.to(inspect_model(model).device)
                result = run(reference)
            finally:
                del reference  # measured once (or failed): its memory goes back to training
                self._free()
        else:
            switch = adapter_switch(model)
            if switch is None:
                return None
            trainable = [(p, p.requires_grad) for p in model.parameters()]
            try:
                with switch():
                    result = run(model)
            finally:
                for p, flag in trainable:  # peft's re-enabling marks every active adapter trainable
                    if p.requires_grad != flag:
                        p.requires_grad_(flag)
        self.products = {f"reference_{name}": getattr(result, name) for name in REFERENCED}
        log.info("memwatch: measured the reference (%s) on the panel", self.description)
        return self.products

    def disable(self) -> None:
        """No reference for the rest of the run (its measurement failed): the calibrated signals stay absent."""
        self.description = None
        self.close()

    def close(self) -> None:
        """Release a reference not yet measured."""
        if self.model is not None:
            self.model = None
            self._free()

    def _free(self) -> None:
        if self._loaded:
            with contextlib.suppress(Exception):
                from memwatch.live.measure import free_memory

                free_memory()
