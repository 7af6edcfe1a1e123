"""The reference model: a PEFT model's base (adapters disabled) or a model you name, measured once and cached."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["Reference", "adapter_switch"]

log = logging.getLogger("memwatch")


def _unwrap(model: Any) -> Any:
    """The model inside DDP / DataParallel / Accelerate wrappers."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def adapter_switch(model: Any) -> Callable[[], contextlib.AbstractContextManager[Any]] | None:
    """A context manager factory that runs `model` as its base (adapters off, then restored), or None when the
    model has no adapters: a peft PeftModel (`disable_adapter()`), or a transformers model with adapters loaded
    through its PEFT integration (`disable_adapters()` / `enable_adapters()`)."""
    inner = _unwrap(model)
    if hasattr(inner, "peft_config") and callable(getattr(inner, "disable_adapter", None)):
        return inner.disable_adapter
    if getattr(inner, "_hf_peft_config_loaded", False) and callable(getattr(inner, "disable_adapters", None)):

        @contextlib.contextmanager
        def disabled() -> Iterator[None]:
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
    of a model with the same tokenizer (loaded once, on the trained model's device and dtype, freed after its one
    measurement), a model object, or None (off). Both kinds are frozen during training (LoRA trains the adapters
    only), so one measurement serves every evaluation; a resumed run measures it again at its first evaluation.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.model: Any = None if isinstance(source, str | os.PathLike) or source is None else source
        self.products: dict[str, np.ndarray] | None = None
        self.description: str | None = None

    def setup(self, model: Any) -> str | None:
        """Load a named reference (at setup, so a wrong path or tokenizer is said before training); the
        description of what will serve as the reference, or None."""
        from memwatch.engine.modeling import inspect_model
        from memwatch.live.setup import SetupError

        source = self.source
        if source is None:
            return None
        if source == "auto":
            self.description = "the PEFT base model (adapters disabled)" if adapter_switch(model) else None
            return self.description
        if self.model is None:
            import transformers
            from transformers import AutoModelForCausalLM

            live = inspect_model(model)
            # transformers 4.56 renamed torch_dtype to dtype (and 5.x warns on the old name).
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
            try:
                self.model = AutoModelForCausalLM.from_pretrained(
                    os.fspath(source), **{key: live.param_dtype}
                )
            except (OSError, ValueError) as exc:
                raise SetupError(
                    f"MonitorConfig.reference={source!r} could not be loaded as a causal LM ({exc}); name a local "
                    "model directory (or hub name) with the trained model's tokenizer, 'auto' or None"
                ) from exc
            self.model.to(live.device)
            self.description = f"the model at {os.fspath(source)}"
        else:
            self.description = f"the reference model given ({type(self.model).__name__})"
        self.model.requires_grad_(False)
        ref, live = inspect_model(self.model), inspect_model(model)
        if ref.vocab_size != live.vocab_size:
            raise SetupError(
                f"the reference model has a vocabulary of {ref.vocab_size} tokens and the trained model "
                f"{live.vocab_size}: a reference must share the trained model's tokenizer"
            )
        return self.description

    def measure(self, model: Any, run: Callable[[Any], Any]) -> dict[str, np.ndarray] | None:
        """The reference products, measured once by `run(reference_model)` -> ExtractionResult, then cached."""
        if self.products is not None or self.description is None:
            return self.products
        if self.model is not None:
            result = run(self.model)
            self.model = None  # measured once: its memory goes back to training
            with contextlib.suppress(Exception):
                from memwatch.live.measure import _free_memory

                _free_memory()
        else:
            switch = adapter_switch(model)
            if switch is None:
                return None
            with switch():
                result = run(model)
        self.products = {
            "reference_token_logprobs": result.token_logprobs,
            "reference_token_logp_mean": result.token_logp_mean,
            "reference_token_logp_var": result.token_logp_var,
            "reference_match_count": result.match_count,
            "reference_exact": result.exact,
        }
        log.info("memwatch: measured the reference (%s) on the panel", self.description)
        return self.products
