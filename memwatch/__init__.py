"""memwatch: a training-time memorization monitor for language models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names, loaded on first use so that `import memwatch` (and `memwatch --help`) never imports torch.
_LAZY = {
    "extract": "memwatch.engine.extraction",
    "ExtractionResult": "memwatch.engine.extraction",
    "MonitorConfig": "memwatch.config",
    "AlertConfig": "memwatch.config",
    "Monitor": "memwatch.live.monitor",
    "SetupError": "memwatch.live.setup",
    "Sink": "memwatch.live.sinks",
    "EvalRecord": "memwatch.record",
    "ConfigError": "memwatch.config",
    "scan": "memwatch.posthoc.scan",
    "Probe": "memwatch.probes",
    "MemWatchCallback": "memwatch.integrations.hf",
    "exposure": "memwatch.signals.exposure",
    "History": "memwatch.store.runs",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from memwatch.config import AlertConfig as AlertConfig
    from memwatch.config import ConfigError as ConfigError
    from memwatch.config import MonitorConfig as MonitorConfig
    from memwatch.engine.extraction import ExtractionResult as ExtractionResult
    from memwatch.engine.extraction import extract as extract
    from memwatch.integrations.hf import MemWatchCallback as MemWatchCallback
    from memwatch.live.monitor import Monitor as Monitor
    from memwatch.live.setup import SetupError as SetupError
    from memwatch.live.sinks import Sink as Sink
    from memwatch.posthoc.scan import scan as scan
    from memwatch.probes import Probe as Probe
    from memwatch.record import EvalRecord as EvalRecord
    from memwatch.signals.exposure import exposure as exposure
    from memwatch.store.runs import History as History


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'memwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
