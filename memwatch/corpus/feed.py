"""The Monitor's n-gram feed: opens the index at setup, takes the batches, hands the corpus products to each evaluation."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from memwatch.corpus.build import dataset_index, documents_of_batch, latest_dataset_index
from memwatch.corpus.index import MissingPackageError, NgramSource, Vocabulary, require_tokengrams
from memwatch.corpus.stats import MAX_ORDER, ngram_products
from memwatch.corpus.stream import StreamingIndex

__all__ = ["MODES", "NgramFeed"]

log = logging.getLogger("memwatch")

MODES = ("off", "stream", "dataset")


class NgramFeed:
    """The n-gram index of one monitored run (MonitorConfig.ngrams) and what each evaluation gets from it.

    mode "dataset": the tokenized training set indexed at setup (or `corpus`, any NgramSource you give: an
    InfiniGramIndex, a CorpusIndex), static counts; "stream": the batches given to `observe` (each micro-batch's
    input_ids and attention_mask), sealed into the index at step boundaries and before each evaluation, so counts
    are "seen so far". Under torch.distributed rank 0 holds the index: the other ranks keep their batches until the
    next evaluation, send them to rank 0 then, and receive the products (`comm`: memwatch.live.distributed).

    It never stops training: a failure while feeding or counting is logged once and switches the feed off (the
    n-gram signals are then absent); strict=True re-raises instead."""

    def __init__(
        self, mode: str, *, comm: Any, corpus: NgramSource | None = None, strict: bool = False
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"ngrams must be one of {MODES}; got {mode!r}")
        self.mode = mode
        self.comm = comm
        self.corpus = corpus
        self.strict = strict
        self.source: NgramSource | None = None  # static counts (mode "dataset")
        self.stream: StreamingIndex | None = None  # rank 0 in mode "stream"
        self.vocab: Vocabulary | None = None
        self.directory: Path | None = None
        self.failed: str | None = (
            None  # off for the run, as every rank knows (agreed at setup or an evaluation)
        )
        self._error: str | None = None  # this rank's own failure, told to rank 0 at the next evaluation
        self.observed_tokens = 0  # tokens this rank has taken from batches (separators included)
        self._device: list[tuple[Any, Any, Any]] = []  # batches still on their way from the accelerator
        self._flat: list[np.ndarray] = []  # documents with their separators, not yet in the stream
        self._early: list[np.ndarray] = []  # documents observed before setup told the vocabulary
        self._documents = 0  # documents laid out here (numbers their separators)
        self._cache: tuple[Any, dict[str, Any]] | None = None
        self._group: Any = None  # the host-side process group with a long timeout (distributed only)
        self._start_step = 0
        self._received = 0  # tokens rank 0 took into the stream since setup, from every rank

    @property
    def on(self) -> bool:
        return self.mode != "off" and self.failed is None and self._error is None

    # --- setup --------------------------------------------------------------------------------------------------

    def setup(
        self,
        *,
        vocab_size: int,
        train_data: Any,
        directory: str | os.PathLike[str],
        run_name: str,
        start_step: int = 0,
        source: str = "live",
        progress: bool = True,
        error: type[Exception] = ValueError,
    ) -> None:
        """Open or build the index (rank 0; every rank learns the outcome). A missing tokengrams, or a corpus given
        with mode "stream", raises `error` on every rank; other failures switch the feed off (strict: raise)."""
        if self.mode == "off":
            if self.corpus is not None:
                raise error(
                    "an n-gram corpus was given but MonitorConfig.ngrams is 'off'; set ngrams='dataset'"
                )
            return
        if self.mode == "stream" and self.corpus is not None:
            raise error(
                "an n-gram corpus was given with MonitorConfig.ngrams='stream'; a given index serves static counts: "
                "set ngrams='dataset'"
            )
        self.vocab = Vocabulary(int(vocab_size))
        self.directory = Path(directory)
        self._start_step = int(start_step)
        if self.comm.is_distributed():
            # Rank 0 may index a whole training set here while the others wait: a group that waits long enough.
            self._group = self.comm.host_group()
        early, self._early = self._early, []
        if self.mode == "stream":
            self._add(early)
        outcome: dict[str, Any] = {}
        if self.comm.is_main_process():
            try:
                self._open(train_data, run_name, start_step, source, progress)
                if self._error is not None:
                    outcome = {"failed": self._error}
            except MissingPackageError as exc:
                outcome = {"refused": str(exc)}
            except Exception as exc:
                if self.strict:
                    outcome = {
                        "refused": f"the n-gram index could not be opened: {type(exc).__name__}: {exc}"
                    }
                else:
                    log.error(
                        "memwatch: the n-gram index could not be opened; n-gram signals are off", exc_info=exc
                    )
                    outcome = {"failed": f"{type(exc).__name__}: {exc}"}
        outcome = self.comm.broadcast(outcome, group=self._group)
        if "refused" in outcome:
            self.close()
            raise error(outcome["refused"])
        if "failed" in outcome:
            self.failed = outcome["failed"]

    def _open(self, train_data: Any, run_name: str, start_step: int, source: str, progress: bool) -> None:
        assert self.vocab is not None and self.directory is not None
        if self.corpus is not None:
            self.source = self.corpus
            return
        require_tokengrams()
        if self.mode == "dataset":
            if train_data is not None:
                built = dataset_index(train_data, self.directory, self.vocab.size, progress=progress)
            else:
                built = latest_dataset_index(self.directory)
                if built is None:
                    log.warning(
                        "memwatch: ngrams='dataset' without training data, and no index cached in %s: the n-gram "
                        "signals are absent",
                        self.directory,
                    )
                    self._error = "no training data to index"
                    return
            if built.index.vocabulary.size != self.vocab.size:
                raise ValueError(
                    f"the cached n-gram index in {built.directory} is of a {built.index.vocabulary.size}-id vocabulary; "
                    f"the model has {self.vocab.size}"
                )
            self.source = built.index
            log.info(
                "memwatch: n-gram counts from %s (%d tokens, %s)",
                built.directory,
                built.tokens,
                "cached" if built.reused else f"built in {built.seconds:.1f}s",
            )
            return
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name or "run")
        self.stream = StreamingIndex(self.directory / f"stream-{safe}", self.vocab)
        if source == "scan":
            # A scan reads checkpoints, not batches: the stream its training run left serves as static counts.
            self.source = self.stream.index
            self.stream = None
        elif start_step > 0:
            removed = self.stream.truncate(start_step)
            if removed:
                log.info(
                    "memwatch: resumed at step %d; dropped %d streamed tokens seen after it",
                    start_step,
                    removed,
                )
        else:
            self.stream.clear()  # a new run under the same name starts from nothing

    # --- batches ------------------------------------------------------------------------------------------------

    def observe(self, input_ids: Any, attention_mask: Any = None) -> None:
        """One micro-batch the model trains on (mode "stream"; otherwise nothing): input_ids [B, T], attention_mask
        [B, T] or None. On an accelerator the tokens are copied to the host without waiting (an event marks when
        they are there), so training is not held up; they are read at the next step boundary."""
        if self.mode != "stream" or self.failed is not None or self._error is not None:
            return
        try:
            device = getattr(input_ids, "device", None)
            if device is not None and getattr(device, "type", "cpu") == "cuda":
                import torch

                ids = input_ids.detach().to("cpu", non_blocking=True)
                mask = (
                    None if attention_mask is None else attention_mask.detach().to("cpu", non_blocking=True)
                )
                event = torch.cuda.Event()
                event.record()
                self._device.append((ids, mask, event))
            else:
                self._add(documents_of_batch(input_ids, attention_mask))
        except Exception as exc:
            self._fail(exc, "taking a batch")

    def _add(self, documents: list[np.ndarray]) -> None:
        vocab = self.vocab
        if vocab is None:  # batches before setup: laid out once the vocabulary is known
            self._early.extend(documents)
            return
        for doc in documents:
            if not doc.size:
                continue
            if int(doc.min()) < 0 or int(doc.max()) >= vocab.size:
                raise ValueError(
                    f"a batch holds token ids outside the model's vocabulary of {vocab.size} ids"
                )
            sep = int(vocab.separators(self._documents, 1)[0])
            self._documents += 1
            self._flat.append(np.r_[doc, sep].astype(vocab.dtype))
            self.observed_tokens += int(doc.size) + 1

    def _arrived(self) -> None:
        """Lay out the batches copied from the accelerator (their copies are complete once the event is)."""
        device, self._device = self._device, []
        for ids, mask, event in device:
            event.synchronize()
            self._add(documents_of_batch(ids, mask))

    def _pending(self) -> np.ndarray:
        flat, self._flat = self._flat, []
        dtype = self.vocab.dtype if self.vocab is not None else np.uint32
        return np.concatenate(flat) if flat else np.zeros(0, dtype)

    def end_step(self, step: int) -> None:
        """A step boundary (after optimizer step `step`): rank 0 seals the pending batches once they fill a shard."""
        if self.mode != "stream" or self.failed is not None or self._error is not None:
            return
        try:
            self._arrived()
            if self.stream is not None:
                self._received += self.stream.add_flat(self._pending())
                self.stream.maybe_seal(step)
        except Exception as exc:
            self._fail(exc, "indexing the batches")

    def checkpoint(self, step: int) -> None:
        """A checkpoint of optimizer step `step` is being saved (mode "stream"): every batch seen so far is written
        and indexed now, so a run resumed from this checkpoint counts each batch exactly once (what was still in
        memory would otherwise be lost with a crash after it). Under torch.distributed every rank calls it."""
        if self.mode != "stream" or self.failed is not None:
            return
        gathered, errors = self._gather()
        if not self.comm.is_main_process() or self._error is not None or errors:
            return  # a failure is told to every rank at the next evaluation
        try:
            self._take(gathered)
            assert self.stream is not None
            self.stream.seal(step)
        except Exception as exc:
            self._fail(exc, "indexing the batches")

    def _gather(self) -> tuple[list[np.ndarray] | None, list[str]]:
        """Under torch.distributed, every rank's pending batches (with separators) and failures, on every rank;
        (None, []) in one process. Every rank joins, failed or not."""
        if not self.comm.is_distributed():
            return None, []
        local = np.zeros(0, np.uint32)
        if self._error is None:
            try:
                self._arrived()
                local = self._pending()
            except Exception as exc:
                self._fail(exc, "indexing the batches")
        gathered = self.comm.all_gather((local, self._error), group=self._group)
        return [flat for flat, _ in gathered], [e for _, e in gathered if e is not None]

    def _take(self, gathered: list[np.ndarray] | None) -> None:
        """Rank 0: what every rank (or this process) observed, into the stream."""
        assert self.stream is not None
        if gathered is not None:
            for flat in gathered:
                self._received += self.stream.add_flat(flat)
        else:
            self._arrived()
            self._received += self.stream.add_flat(self._pending())

    # --- products -----------------------------------------------------------------------------------------------

    def products(self, tokens: np.ndarray, k: int, m: int, step: int) -> dict[str, Any]:
        """The corpus products of the panel tokens [N, k + m] at this evaluation (memwatch.corpus.stats), on every
        rank; {} when the feed is off. Every rank must call it: under torch.distributed the ranks' batches go to rank
        0 and its products (or its decision to switch the feed off, when any rank failed) come back to all."""
        if self.mode == "off" or self.failed is not None:  # agreed by every rank: no collective to join
            return {}
        distributed = self.comm.is_distributed()
        gathered, errors = self._gather() if self.mode == "stream" else (None, [])
        payload: dict[str, Any] | None = None
        if self.comm.is_main_process():
            if self._error is not None or errors:
                payload = {"off": self._error or errors[0]}
            else:
                try:
                    payload = self._compute(tokens, k, m, step, gathered)
                except Exception as exc:
                    if self.strict:
                        payload = {"raise": f"{type(exc).__name__}: {exc}"}
                    else:
                        log.error("memwatch: counting n-grams failed; n-gram signals are off", exc_info=exc)
                        payload = {"off": f"{type(exc).__name__}: {exc}"}
        if distributed:
            payload = self.comm.broadcast(payload, group=self._group)
        assert payload is not None
        if "raise" in payload:
            raise RuntimeError(f"memwatch: counting n-grams failed on rank 0: {payload['raise']}")
        if "off" in payload:
            self.failed = payload["off"]
            self._device, self._flat = [], []
            return {}
        return payload

    def _compute(
        self, tokens: np.ndarray, k: int, m: int, step: int, gathered: list[np.ndarray] | None
    ) -> dict:
        if self.stream is not None:
            self._take(gathered)
            if step > self._start_step and not self._received:
                # Steps have passed and not one batch reached the index: counts "seen so far" would read zero
                # for everything, which is wrong, not merely empty.
                log.warning(
                    "memwatch: ngrams='stream' but no training batch has been observed by step %d (the batches hold "
                    "no input_ids, or your loop does not call monitor.observe_batch(input_ids, attention_mask) per "
                    "micro-batch); the n-gram signals are off. Call observe_batch, or set ngrams='dataset'.",
                    step,
                )
                return {"off": "no training batch observed"}
            self.stream.seal(step)
            source: NgramSource = self.stream.index
        else:
            assert self.source is not None
            source = self.source
        tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64)[:, : k + m])
        # Counts change only with the index: a static index is counted once per panel.
        key = (getattr(source, "version", None), k, m, hashlib.sha1(tokens.tobytes()).hexdigest())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        products = ngram_products(source, tokens, k, m, MAX_ORDER)
        self._cache = (key, products)
        return products

    # --- the end ------------------------------------------------------------------------------------------------

    def _fail(self, exc: Exception, what: str) -> None:
        """This rank's failure: logged once; the feed goes off for every rank at the next evaluation."""
        if self.strict:
            raise exc
        if self._error is None:
            log.error("memwatch: %s for the n-gram index failed; n-gram signals are off", what, exc_info=exc)
        self._error = f"{type(exc).__name__}: {exc}"
        self._device, self._flat = [], []

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        closer = getattr(self.source, "close", None)
        if callable(closer):
            closer()
