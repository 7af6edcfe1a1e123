"""One evaluation's measurement, framework-free: shard, extract with out-of-memory backoff, exposure, gather."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from memwatch.config import MonitorConfig
from memwatch.live import distributed

__all__ = ["EvaluationError", "Measure", "free_memory", "is_oom"]

log = logging.getLogger("memwatch")


class EvaluationError(RuntimeError):
    """An evaluation failed on some rank (the message says which and why)."""


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of the accelerator or the host, whatever raised it."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, MemoryError):  # Python's own (numpy, host allocations): whatever its message
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Measure:
    """Measures the panel on a live model: its ExtractionResult and, when due, every canary's exposure.

    Under torch.distributed each rank computes a shard with the same number of forward calls and every rank
    receives all of it, in probe order. The batch size halves on out-of-memory down to 1 and is remembered
    (`batch_size`, saved with the monitor's state). It knows nothing of cadence, records or outputs.
    """

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.batch_size: int | None = config.batch_size  # lowered on out-of-memory, then remembered
        self.amp_dtype: str | None = None

    def __call__(
        self,
        model: Any,
        tokens: np.ndarray,
        *,
        metas: Sequence[Mapping[str, Any]],
        references: Mapping[str, Any] | None,
        entropy_window: int,
        token_stats: bool,
        hidden_prefix: bool,
        exposure: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[Any, dict[str, np.ndarray]]:
        """(ExtractionResult of all rows of tokens [N, k + m], {exposure signal: [N]} when `exposure`, else {})."""
        from memwatch.engine.extraction import ExtractionResult
        from memwatch.engine.extraction import extract as engine_extract

        cfg = self.config

        def extract(rows: np.ndarray, sync: Any) -> Any:
            """memwatch.extract of these rows at the remembered batch size (see _backoff)."""
            return self._backoff(
                model,
                len(rows),
                entropy_window,
                lambda bs: engine_extract(
                    model,
                    tokens[rows],
                    prefix_len=cfg.prefix_len,
                    suffix_len=cfg.suffix_len,
                    entropy_window=entropy_window,
                    batch_size=bs,
                    mode=cfg.mode,
                    amp_dtype=self.amp_dtype,
                    progress=progress,
                    sync=sync,
                    token_stats=token_stats,
                    hidden_prefix=hidden_prefix,
                ),
                "extraction",
                local=sync is None,
            )

        def expose(rows: np.ndarray, sync: Any) -> dict[str, np.ndarray]:
            """Exposure of every canary and twin among `rows` (panel indices, in order): its secret ranked among R
            references after the same prefix, all scored by one prefix-shared teacher-forced pass."""
            if not exposure:
                return {}
            return self._backoff(
                model,
                cfg.exposure_references + 1,
                entropy_window,  # sizes the first halving as the extraction's (one remembered batch size)
                lambda bs: self._score_exposure(model, tokens, metas, references or {}, rows, bs, sync),
                "exposure scoring",
                local=sync is None,
            )

        sweep_ks, _ = cfg.sweep()

        def sweep(rows: np.ndarray, sync: Any, result: Any) -> dict[str, np.ndarray]:
            """The live sweep's prefix match per prefix length ([N, len(ks)] over `rows`): k = prefix_len is the
            extraction's own; each shorter k is one teacher-forced pass on the last k prefix tokens, the
            continuation starting where the extraction's does."""
            if not sweep_ks:
                return {}
            k0, m = cfg.prefix_len, cfg.suffix_len
            columns = []
            for k in sweep_ks:
                if k == k0:
                    columns.append(np.asarray(result.prefix_match_len, dtype=np.int64))
                    continue
                window = tokens[rows][:, k0 - k : k0 + m]  # [n, k + m]
                part = self._backoff(
                    model,
                    len(rows),
                    0,
                    lambda bs, window=window, k=k: engine_extract(
                        model,
                        window,
                        prefix_len=k,
                        suffix_len=m,
                        entropy_window=0,
                        batch_size=bs,
                        mode="exact",
                        amp_dtype=self.amp_dtype,
                        sync=sync,
                    ),
                    "sweep",
                    local=sync is None,
                )
                columns.append(np.asarray(part.prefix_match_len, dtype=np.int64))
            return {"sweep_prefix_match_len": np.stack(columns, axis=1)}

        world = distributed.world_size() if distributed.is_distributed() else 1
        if world == 1:
            everything = np.arange(len(tokens))
            result = extract(everything, None)
            return result, {**expose(everything, None), **sweep(everything, None, result)}
        rank = distributed.rank()
        idx, real = distributed.shard(len(tokens), world, rank)
        sync = None
        if distributed.needs_synced_forward(model):
            from memwatch.engine.modeling import inspect_model

            sync = distributed.Sync(inspect_model(model).device)
        while True:
            payload: Any
            error: Exception | None = None
            try:
                part = extract(idx, sync)
                exp = {**expose(idx, sync), **sweep(idx, sync, part)}
                payload = (part.select(slice(0, real)), {k: v[:real] for k, v in exp.items()})
            except Exception as exc:  # this rank still joins the gather, so no rank is left waiting
                error = exc
                kind = "oom" if is_oom(exc) else "error"
                payload = (kind, f"rank {rank}: {type(exc).__name__}: {exc}")
            parts = distributed.all_gather(payload)
            failed = [p for p in parts if isinstance(p[0], str)]
            if not failed:
                break
            # Out of memory on every rank (synced forwards fail together): all halve the batch and retry together.
            every_rank_oom = len(failed) == len(parts) and all(p[0] == "oom" for p in parts)
            if (
                sync is not None
                and every_rank_oom
                and self._halve_batch(model, len(idx), entropy_window, error, "extraction")
            ):
                continue
            raise EvaluationError("; ".join(p[1] for p in failed)) from error
        result = ExtractionResult.concat([p[0] for p in parts])
        extra = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
        return result, extra

    def _backoff(
        self,
        model: Any,
        rows: int,
        entropy_window: int,
        run: Callable[[int | None], Any],
        what: str,
        local: bool,
    ) -> Any:
        """run(batch_size), halving the batch on out-of-memory down to 1 and remembering the size that worked.

        local=False (synced forwards: FSDP, ZeRO-3): one rank cannot retry alone, the others would wait in a
        collective; the error goes to every rank (__call__), which retries together when all ran out of memory."""
        while True:
            try:
                return run(self.batch_size)
            except Exception as exc:
                if not local or not self._halve_batch(model, rows, entropy_window, exc, what):
                    raise

    def _halve_batch(self, model: Any, rows: int, entropy_window: int, exc: BaseException, what: str) -> bool:
        """After an out-of-memory error: halve the batch size (from the automatic one if none was set yet) and
        free memory. False if the error is no out-of-memory or the batch is already 1 (give up)."""
        if not is_oom(exc):
            return False
        if self.batch_size is None:
            from memwatch.engine.extraction import _auto_batch_size
            from memwatch.engine.modeling import inspect_model

            cfg = self.config
            k, m = cfg.prefix_len, cfg.suffix_len
            self.batch_size = _auto_batch_size(
                inspect_model(model), rows, k, m, entropy_window, cfg.mode, 4, None
            )
        if self.batch_size <= 1:
            return False
        self.batch_size = max(1, self.batch_size // 2)
        log.warning("memwatch: out of memory during %s; retrying with batch_size=%d", what, self.batch_size)
        free_memory()
        return True

    def _score_exposure(
        self,
        model: Any,
        tokens: np.ndarray,
        metas: Sequence[Mapping[str, Any]],
        references: Mapping[str, Any],
        rows: np.ndarray,
        batch_size: int | None,
        sync: Any,
    ) -> dict[str, np.ndarray]:
        from memwatch.engine.extraction import _auto_batch_size, suffix_nll_after_prefix
        from memwatch.engine.modeling import inspect_model
        from memwatch.signals.exposure import exposure, exposure_extrapolated, exposure_rank

        cfg = self.config
        k, m = cfg.prefix_len, cfg.suffix_len
        # One batch size for the whole pass, planned for R + 1 candidates, so that the rows a synced rank only pads
        # (no canary of its own) run the same batches as the canaries on other ranks.
        bs = batch_size or _auto_batch_size(
            inspect_model(model),
            cfg.exposure_references + 1,
            k,
            m,
            w=0,  # no entropies: the pass scores suffixes only
            mode="exact",  # no decoding, so no decode cache
            act_bytes=4,  # fp32 sizing: safe under autocast too
            budget=None,
        )
        forms = {
            "exposure": exposure,
            "exposure_rank": exposure_rank,
            "exposure_extrapolated": exposure_extrapolated,
        }
        out = {name: np.full(len(rows), np.nan) for name in forms}
        for j, i in enumerate(rows.tolist()):
            meta = metas[i]
            refs = references.get(meta.get("family", ""))
            if not refs or "canary_id" not in meta:
                if sync is not None:  # keep the forward count equal across ranks
                    suffix_nll_after_prefix(
                        model, tokens[i, :k], tokens[i : i + 1, k:], sync=sync, batch_size=bs
                    )
                continue
            refs_arr = np.asarray(refs[: cfg.exposure_references], dtype=np.int64)[:, :m]
            candidates = np.concatenate([tokens[i : i + 1, k:], refs_arr])  # the secret first
            nll = suffix_nll_after_prefix(
                model, tokens[i, :k], candidates, batch_size=bs, amp_dtype=self.amp_dtype, sync=sync
            )
            for name, form in forms.items():
                out[name][j] = form(float(nll[0]), nll[1:])
        return out


def free_memory() -> None:
    """Give freed tensors back: Python's garbage first, then the CUDA cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
