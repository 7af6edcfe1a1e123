"""Records for tests: an ExtractionResult (real or made by hand) through the live record building."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.engine.result import ExtractionResult
from memwatch.record import EvalRecord, ProbeTracker, build_record, products_of


def record_of(
    result: ExtractionResult,
    groups: list[str] | np.ndarray,
    *,
    step: int = 0,
    tracker: ProbeTracker | None = None,
    metas: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    tokens: np.ndarray | None = None,
) -> EvalRecord:
    n = len(result)
    spec = {
        "prefix_len": result.prefix_len,
        "suffix_len": result.suffix_len,
        "entropy_window": result.entropy_window,
        "mode": result.mode,
    }
    return build_record(
        step=step,
        spec=spec,
        probe_ids=[f"p{i}" for i in range(n)],
        groups=np.asarray(groups, dtype=object),
        metas=metas or [{} for _ in range(n)],
        tokens=np.zeros((n, result.prefix_len + result.suffix_len), np.int64) if tokens is None else tokens,
        products=products_of(result, extra),
        tracker=tracker or ProbeTracker(n),
        settings=settings,
        result=result,
    )
