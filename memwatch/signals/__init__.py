"""Signals: every number memwatch reports, registered once (numpy only; see registry.py)."""

# isort: off
# Registration order is the order outputs list things in: the extraction numbers first.
from memwatch.signals import extraction, buckets, events, entropy, exposure  # noqa: F401 - registers them
from memwatch.signals import membership, reference, geometry, kinds  # noqa: F401 - registers them
from memwatch.signals import ngrams  # noqa: F401 - registers them (on with MonitorConfig.ngrams)
from memwatch.signals import sweep  # noqa: F401 - registers it (on with MonitorConfig.sweep_prefix_lens / _suffix_lens)

# isort: on
from memwatch.signals.registry import (
    REGISTRY,
    Aggregate,
    Context,
    Contrast,
    GroupStat,
    Registry,
    Scope,
    Signal,
    register_contrast,
    register_group_stat,
    register_signal,
)

__all__ = [
    "REGISTRY",
    "Aggregate",
    "Context",
    "Contrast",
    "GroupStat",
    "Registry",
    "Scope",
    "Signal",
    "register_contrast",
    "register_group_stat",
    "register_signal",
]
