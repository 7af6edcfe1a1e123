import os
import sys
import weakref

import pytest

# Tests import their helpers (_models.py) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _a_monitor_that_fails_cannot_pass(request, monkeypatch):
    """memwatch contains its own errors by design (training goes on), so a test could pass with a monitor that
    throws at every evaluation and switches itself off. Every Monitor a test creates must end without a recorded
    failure, unless the test injects faults on purpose (@pytest.mark.monitor_failures)."""
    from memwatch.monitor import Monitor

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
