"""memwatch: a training-time memorization monitor for language models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names, loaded on first use so that `import memwatch` (and `memwatch --help`) never imports torch.
_LAZY = {
    "extract": "memwatch.extraction",
    "ExtractionResult": "memwatch.extraction",
    "MonitorConfig": "memwatch.config",
    "AlertConfig": "memwatch.config",
    "Monitor": "memwatch.monitor",
    "Probe": "memwatch.probes",
    "MemWatchCallback": "memwatch.integrations.hf",
    "exposure": "memwatch.signals.exposure",
    "History": "memwatch.analysis",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .analysis import History as History
    from .config import AlertConfig as AlertConfig
    from .config import MonitorConfig as MonitorConfig
    from .extraction import ExtractionResult as ExtractionResult
    from .extraction import extract as extract
    from .integrations.hf import MemWatchCallback as MemWatchCallback
    from .monitor import Monitor as Monitor
    from .probes import Probe as Probe
    from .signals.exposure import exposure as exposure


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'memwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
