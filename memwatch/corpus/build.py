"""The index of a tokenized training set, built once at train begin and cached by a hash of the tokens it holds."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memwatch.corpus.index import CorpusIndex, Part, Vocabulary, build_part, require_tokengrams

__all__ = [
    "FORMAT",
    "SHARD_TOKENS",
    "DatasetIndex",
    "TokenWriter",
    "dataset_index",
    "documents_of_batch",
    "iter_documents",
    "latest_dataset_index",
]

log = logging.getLogger("memwatch")

FORMAT = 1  # bumped when the files' layout changes: an older cache is then rebuilt, never misread
# A dataset's tokens are split into shards of about 2^28 tokens (at document boundaries): sorting one takes its
# table (8 bytes a token, 2 GiB) in memory, and a corpus of billions of tokens becomes a handful of shards.
SHARD_TOKENS = 1 << 28
_META = "meta.json"


def _ids(value: Any) -> np.ndarray | None:
    """Token ids as int64 [T] (a list, a numpy array, a tensor; a batch of one is unwrapped), or None."""
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or (not np.issubdtype(arr.dtype, np.integer) and arr.size):
        try:
            arr = arr.astype(np.int64)
        except (TypeError, ValueError):
            return None
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr.astype(np.int64, copy=False).reshape(-1) if arr.ndim <= 1 else None


def _runs(ids: np.ndarray, mask: np.ndarray | None) -> list[np.ndarray]:
    """The real (attended) stretches of one row: padding is never indexed, and a document never spans padding."""
    if mask is None or mask.shape != ids.shape or bool(mask.all()):
        return [ids] if ids.size else []
    real = mask.astype(bool)
    edges = np.flatnonzero(np.diff(np.r_[0, real.astype(np.int8), 0]))  # starts and ends of the runs of ones
    return [ids[s:e] for s, e in zip(edges[::2], edges[1::2], strict=True)]


def documents_of_batch(input_ids: Any, attention_mask: Any = None) -> list[np.ndarray]:
    """The documents of a training batch: each row's attended tokens (a row with padding inside it gives one
    document per attended stretch). input_ids [B, T] or [T]; attention_mask the same shape or None."""
    ids = input_ids.detach().cpu().numpy() if hasattr(input_ids, "detach") else np.asarray(input_ids)
    mask = None
    if attention_mask is not None:
        mask = (
            attention_mask.detach().cpu().numpy()
            if hasattr(attention_mask, "detach")
            else np.asarray(attention_mask)
        )
    ids = np.atleast_2d(ids).astype(np.int64, copy=False)
    if mask is not None:
        mask = np.atleast_2d(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; input_ids has {ids.shape}")
    out: list[np.ndarray] = []
    for r in range(ids.shape[0]):
        out.extend(_runs(ids[r], None if mask is None else mask[r]))
    return out


def iter_documents(data: Any) -> Iterator[np.ndarray]:
    """Every example of a tokenized dataset as the documents the model reads: rows of `input_ids` (a mapping's
    field, or the row itself as a token list), split at padding by `attention_mask` where there is one. Takes lists,
    Hugging Face datasets (read in batches), torch map-style and iterable datasets."""
    columns = getattr(data, "column_names", None)
    if hasattr(data, "iter") and isinstance(columns, list) and "input_ids" in columns:
        masked = "attention_mask" in columns
        for batch in data.iter(batch_size=1024):
            masks = batch["attention_mask"] if masked else [None] * len(batch["input_ids"])
            for ids, mask in zip(batch["input_ids"], masks, strict=True):
                arr = _ids(ids)
                if arr is not None:
                    yield from _runs(arr, None if mask is None else np.asarray(mask))
        return
    rows: Iterable[Any]
    try:
        n = len(data)
        rows = (data[i] for i in range(n))
    except TypeError:
        rows = data
    for row in rows:
        if isinstance(row, Mapping):
            arr = _ids(row.get("input_ids"))
            mask = row.get("attention_mask")
            mask_arr = None if mask is None else _ids(mask)
        else:
            arr, mask_arr = _ids(row), None
        if arr is not None and arr.size:
            yield from _runs(arr, mask_arr)


class TokenWriter:
    """Writes documents, each followed by the separator, into token files of at most about `shard_tokens` (split at
    document boundaries), hashing every byte written (the cache key)."""

    def __init__(self, directory: Path, vocab: Vocabulary, shard_tokens: int = SHARD_TOKENS) -> None:
        self.directory = Path(directory)
        self.vocab = vocab
        self.shard_tokens = shard_tokens
        self.hash = hashlib.sha256(f"memwatch-corpus/{FORMAT}/{vocab.size}".encode())
        self.shards: list[tuple[str, int]] = []  # (file name, tokens)
        self.documents = 0
        self._file: Any = None
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.shards) + self._buffered

    def add(self, doc: np.ndarray) -> None:
        doc = np.asarray(doc, dtype=np.int64)
        if not doc.size:
            return
        if int(doc.min()) < 0 or int(doc.max()) >= self.vocab.size:
            bad = int(doc.max()) if int(doc.max()) >= self.vocab.size else int(doc.min())
            raise ValueError(
                f"token id {bad} is outside the model's vocabulary of {self.vocab.size} ids: the n-gram index "
                "stores ids below the vocabulary size (and one separator id after them)"
            )
        if self._file is None:
            self._open()
        elif self.shards[-1][1] + self._buffered >= self.shard_tokens:  # a new shard, at a document boundary
            self._flush()
            self._close()
            self._open()
        sep = int(self.vocab.separators(self.documents, 1)[0])
        self._buffer.append(np.r_[doc, sep].astype(self.vocab.dtype))
        self._buffered += doc.size + 1
        self.documents += 1
        if self._buffered >= 1 << 20:
            self._flush()

    def _open(self) -> None:
        name = f"part-{len(self.shards):04d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 - closed by _close
        self.shards.append((name, 0))

    def _flush(self) -> None:
        if not self._buffer:
            return
        data = np.concatenate(self._buffer).tobytes()
        self._file.write(data)
        self.hash.update(data)
        name, n = self.shards[-1]
        self.shards[-1] = (name, n + self._buffered)
        self._buffer, self._buffered = [], 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> str:
        """Flush, close, and return the hex digest of everything written."""
        if self._file is not None:
            self._flush()
            self._close()
        return self.hash.hexdigest()


@dataclass
class DatasetIndex:
    """A cached dataset index: where it lives, what it holds, and whether this call reused it (no rebuild)."""

    directory: Path
    key: str
    index: CorpusIndex
    tokens: int
    documents: int
    reused: bool
    seconds: float  # the time this call took (the build, or the hashing pass that found the cache)


def _open_cached(directory: Path) -> tuple[CorpusIndex, dict[str, Any]] | None:
    meta_path = directory / _META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT:
        return None
    vocab = Vocabulary(int(meta["vocab_size"]))
    parts = [
        Part(directory / name, directory / name.replace(".bin", ".idx"), int(n), vocab)
        for name, n in meta["shards"]
    ]
    if not all(p.tokens_path.exists() and p.index_path.exists() for p in parts):
        return None
    return CorpusIndex(parts, vocab, version=("dataset", meta["key"])), meta


def _fingerprint(data: Any) -> str | None:
    """A Hugging Face dataset's own content fingerprint (its cache key), so a cached index is found without reading
    the data; None for other datasets (their tokens are hashed)."""
    value = getattr(data, "_fingerprint", None)
    return value if isinstance(value, str) and value else None


def _progress(total: int | None, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(advance(examples), stop()) of a transient rich progress bar on stderr; no-ops when disabled."""
    if not enabled:
        return (lambda _n: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("memwatch: indexing the training data"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("index", total=total)
    bar.start()
    return (lambda n: bar.advance(task, n)), bar.stop


def dataset_index(
    data: Any,
    root: str | os.PathLike[str],
    vocab_size: int,
    *,
    progress: bool = True,
    shard_tokens: int = SHARD_TOKENS,
) -> DatasetIndex:
    """The n-gram index of a tokenized training set (iter_documents), built once under `root` (e.g.
    <output_dir>/memwatch/corpus) and found again by the hash of the token files it would write: a resumed run, a
    scan or a second run on the same data reuses it; changed data (or another vocabulary) builds a new one. A
    Hugging Face dataset is found by its fingerprint without reading it. The build writes into a temporary folder
    renamed into place when complete, so an interrupted build is never reused."""
    require_tokengrams()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary(int(vocab_size))
    t0 = time.perf_counter()
    fingerprint = _fingerprint(data)
    if fingerprint is not None:
        for meta_path in sorted(root.glob(f"*/{_META}")):
            opened = _open_cached(meta_path.parent)
            if (
                opened
                and opened[1].get("fingerprint") == fingerprint
                and opened[1]["vocab_size"] == vocab.size
            ):
                index, meta = opened
                return DatasetIndex(
                    meta_path.parent,
                    meta["key"],
                    index,
                    meta["tokens"],
                    meta["documents"],
                    True,
                    time.perf_counter() - t0,
                )
    work = Path(root / f".building-{os.getpid()}-{time.time_ns()}")
    work.mkdir()
    try:
        writer = TokenWriter(work, vocab, shard_tokens)
        try:
            total = len(data)
        except TypeError:
            total = None
        advance, stop = _progress(total, progress)
        try:
            for doc in iter_documents(data):
                writer.add(doc)
                advance(1)  # counts documents: a padded row with holes advances more than once (rare)
        finally:
            stop()
        digest = writer.close()
        key = digest[:16]
        final = root / key
        opened = _open_cached(final)
        if opened is not None:
            index, meta = opened
            return DatasetIndex(
                final, key, index, meta["tokens"], meta["documents"], True, time.perf_counter() - t0
            )
        shards = [(name, n) for name, n in writer.shards if n > 0]
        for name, _n in shards:
            build_part(work / name, work / name.replace(".bin", ".idx"), vocab)
        meta = {
            "format": FORMAT,
            "key": key,
            "sha256": digest,
            "fingerprint": fingerprint,
            "vocab_size": vocab.size,
            "separators": [vocab.size, vocab.vocab],
            "dtype": vocab.dtype.str,
            "tokens": writer.tokens,
            "documents": writer.documents,
            "shards": shards,
            "built_at": time.time(),
            "build_seconds": time.perf_counter() - t0,
        }
        (work / _META).write_text(json.dumps(meta, indent=1))
        if final.exists():  # an incomplete earlier build under the same key
            shutil.rmtree(final)
        os.replace(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    opened = _open_cached(final)
    assert opened is not None
    log.info(
        "memwatch: indexed %d training tokens (%d documents) in %.1fs into %s",
        meta["tokens"],
        meta["documents"],
        meta["build_seconds"],
        final,
    )
    return DatasetIndex(
        final, key, opened[0], meta["tokens"], meta["documents"], False, time.perf_counter() - t0
    )


def latest_dataset_index(root: str | os.PathLike[str]) -> DatasetIndex | None:
    """The most recently built complete dataset index under `root` (a scan, which has no training data), or None."""
    root = Path(root)
    found = []
    for meta_path in root.glob(f"*/{_META}"):
        opened = _open_cached(meta_path.parent)
        if opened is not None:
            found.append((opened[1].get("built_at", 0.0), meta_path.parent, opened))
    if not found:
        return None
    _, directory, (index, meta) = max(found, key=lambda f: f[0])
    return DatasetIndex(directory, meta["key"], index, meta["tokens"], meta["documents"], True, 0.0)
