import logging
import os
import sys
import warnings
import weakref

import pytest

# Tests import their helpers (_models.py) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a hub: a lookup that would try (a name that is not a local path) fails at once instead of
# waiting for network timeouts. W&B stays offline too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import memwatch

_MEMWATCH_DIR = os.path.dirname(os.path.abspath(memwatch.__file__)) + os.sep


def _called_from_memwatch() -> bool:
    """Whether memwatch's own code is on the current call stack (the warning is then memwatch's doing)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_MEMWATCH_DIR):
            return True
        frame = frame.f_back
    return False


class _DeprecationLog(logging.Handler):
    """Collects transformers' "deprecated" log messages emitted while memwatch's code runs."""

    def __init__(self, found: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower() and _called_from_memwatch():
            self.found.append(f"transformers log: {message}")


@pytest.fixture(autouse=True)
def _memwatch_calls_no_deprecated_api(monkeypatch):
    """Deprecation and future warnings caused by memwatch's own calls fail the test, so the next library release
    cannot break memwatch silently: Python warnings (e.g. transformers' `deprecate_kwarg`) and transformers' log
    messages (e.g. "`past_key_values`/`cache_params` are deprecated"), attributed by the call stack at the
    moment they are raised. Warnings that memwatch does not cause pass through to pytest as usual."""
    found: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning | FutureWarning) and _called_from_memwatch():
            found.append(f"{category.__name__}: {message} ({filename}:{lineno})")
        # Hand it on to whatever records warnings now (pytest's capture), as the default hook would.
        warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    # Every occurrence, not once per location: the test code may have triggered the same one first. Appended, so
    # the narrow ignores in pyproject still apply.
    warnings.filterwarnings("always", category=FutureWarning, append=True)
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # warning_once would stay silent after its first message in this process
        monkeypatch.setattr(logging.Logger, "warning_once", hf_logging.warning_once.__wrapped__)
    hf_logger = logging.getLogger("transformers")
    handler = _DeprecationLog(found)
    hf_logger.addHandler(handler)
    level = hf_logger.level
    if level > logging.WARNING:  # a test (or memwatch's demo) silenced transformers: still hear deprecations
        hf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(level)
    if found:
        pytest.fail("memwatch called deprecated API:\n" + "\n".join(dict.fromkeys(found)), pytrace=False)


@pytest.fixture(autouse=True)
def _a_monitor_that_fails_cannot_pass(request, monkeypatch):
    """memwatch contains its own errors by design (training goes on), so a test could pass with a monitor that
    throws at every evaluation and switches itself off. Every Monitor a test creates must end without a recorded
    failure, unless the test injects faults on purpose (@pytest.mark.monitor_failures)."""
    from memwatch.live.monitor import Monitor

    created: list[weakref.ref] = []
    init = Monitor.__init__

    def tracking_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append(weakref.ref(self))

    monkeypatch.setattr(Monitor, "__init__", tracking_init)
    yield
    if request.node.get_closest_marker("monitor_failures"):
        return
    failed = [m.failures for ref in created if (m := ref()) is not None and m.failures]
    assert not failed, f"a monitor recorded failures: {failed}"
