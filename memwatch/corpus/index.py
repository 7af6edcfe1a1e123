"""The training-data n-gram index: token shards on disk, each with a tokengrams suffix array, counts summed over them."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "IN_MEMORY_TOKENS",
    "POSITIONS_LIMIT",
    "SEPARATORS",
    "CorpusIndex",
    "InfiniGramIndex",
    "MissingPackageError",
    "NgramSource",
    "Part",
    "Vocabulary",
    "build_part",
    "require_tokengrams",
]

# A shard of up to 2^24 tokens is opened in memory (its suffix table is 8 bytes a token: 128 MiB at most), where a
# count is a few microseconds; larger shards are memory-mapped, and the operating system keeps what is hot.
IN_MEMORY_TOKENS = 1 << 24
# The distinct continuations of a context (Kneser-Ney's N1+(q .)) are read from its occurrences up to this many
# (tokengrams' `positions`, then the next token from the shard's own tokens), from `count_next` above it: measured
# on 10M tokens, positions cost ~0.03 ms + 0.8 us an occurrence, count_next ~0.6 ms + 0.04 us an occurrence.
POSITIONS_LIMIT = 1024


class MissingPackageError(ImportError):
    """An optional package memwatch needs for what was asked is not installed; the message names the install."""


def require_tokengrams() -> Any:
    """The tokengrams module, or a MissingPackageError naming `pip install 'memwatch[ngrams]'`."""
    try:
        import tokengrams
    except ImportError as exc:
        raise MissingPackageError(
            "memwatch's training-data n-gram index (MonitorConfig.ngrams) needs the optional package 'tokengrams', "
            "which is not installed: pip install 'memwatch[ngrams]', or set MonitorConfig(ngrams='off')"
        ) from exc
    return tokengrams


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """tokengrams prints "Sorting indices..." from Rust on every build: keep the trainer's console clean by pointing
    file descriptor 1 at /dev/null for the build (Python's own buffered output is flushed first)."""
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout (a notebook kernel, a closed stream): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# Documents end with one of 256 separator ids (after the token ids), drawn by a hash of the document's number.
# tokengrams sorts suffixes by comparing them token by token, so the cost of a comparison is the length of their
# common prefix: with one separator id, a document repeated back to back (an epoch seen again in the same order, a
# canary inserted r times in a row) makes each copy's suffixes agree through all the copies after it, and the sort
# goes quadratic (measured: 1M tokens with runs of duplicates, 200 s instead of 0.4 s). Different separators stop
# every comparison at the end of the document; counts never include a separator, so they are unchanged.
SEPARATORS = 256


@dataclass(frozen=True)
class Vocabulary:
    """Token ids 0..size-1, then SEPARATORS separator ids written after documents.

    A query holds token ids only, so no n-gram it matches can contain a separator: counts never cross a document
    boundary, and every occurrence of a query is followed by some token (the files end with a separator), so
    count(q) equals the sum of count_next(q), as Kneser-Ney needs. To the counting side the separators are one id,
    `separator` = size (count_next vectors have size + 1 entries). Ids and separators in 16 bits while they fit
    (vocabularies up to 65,280 ids: GPT-2, Pythia), else in 32 bits (tokengrams' `vocab` above 2^16 selects its u32
    tables)."""

    size: int

    def __post_init__(self) -> None:
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 < self.size <= (1 << 32) - SEPARATORS
        ):
            raise ValueError(
                f"a vocabulary size must be an integer in [1, 2^32 - {SEPARATORS}]; got {self.size!r}"
            )

    @property
    def separator(self) -> int:
        """The separators' id to the counting side (count_next's last entry)."""
        return self.size

    @property
    def logical(self) -> int:
        """The length of a count_next vector: the token ids and one separator."""
        return self.size + 1

    @property
    def vocab(self) -> int:
        """tokengrams' `vocab`: the token ids and every separator id."""
        return self.size + SEPARATORS

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.vocab <= 1 << 16 else np.dtype("<u4")

    @property
    def wide(self) -> bool:
        return self.dtype.itemsize == 4

    def separators(self, first: int, n: int) -> np.ndarray:
        """The separator ids ending documents first .. first + n - 1 (a fixed hash of the number), int64 [n]."""
        z = (np.arange(first, first + n, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(31)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        return (z >> np.uint64(56)).astype(np.int64) % SEPARATORS + self.size

    def collapse(self, counts: np.ndarray) -> np.ndarray:
        """A [vocab] vector over token and separator ids as the counting side sees it: [logical], separators summed."""
        counts = np.asarray(counts, dtype=np.int64)
        out = np.zeros(self.logical, np.int64)
        out[: self.size] = counts[: self.size]
        out[self.size] = counts[self.size :].sum()
        return out


@runtime_checkable
class NgramSource(Protocol):
    """What serves n-gram counts (memwatch's CorpusIndex, or an InfiniGramIndex over an existing index).

    vocab: the length of a count_next vector; total(): the tokens indexed; count(q): occurrences of the token
    sequence q; count_next(q): int64 [vocab], how often each token follows q; batch_* the same for many queries.
    Optional: unigram_counts() -> [vocab] and distinct_next(queries) -> [len] (faster paths), `version` (changes
    when the counts do; None or absent: static)."""

    vocab: int

    def total(self) -> int: ...

    def count(self, tokens: Sequence[int]) -> int: ...

    def count_next(self, tokens: Sequence[int]) -> np.ndarray: ...

    def batch_count(self, queries: Sequence[Sequence[int]]) -> np.ndarray: ...

    def batch_count_next(self, queries: Sequence[Sequence[int]]) -> list[np.ndarray]: ...


def build_part(
    tokens_path: str | os.PathLike[str], index_path: str | os.PathLike[str], vocab: Vocabulary
) -> None:
    """Sort a token file's suffix array into index_path (tokengrams' MemmapIndex.build, quiet)."""
    tokengrams = require_tokengrams()
    with _quiet_stdout():
        tokengrams.MemmapIndex.build(
            os.fspath(tokens_path), os.fspath(index_path), vocab=vocab.vocab, verbose=False
        )


@dataclass
class Part:
    """One shard: a token file (documents, each followed by a separator) and its suffix array, opened lazily: in
    memory up to IN_MEMORY_TOKENS, memory-mapped above. A sealed shard never changes, so what was asked of it is
    kept (the panel's counts, the contexts' successors, the unigram table) and a merge of two shards adds theirs:
    a streamed index asks only its newest shard at each evaluation."""

    tokens_path: Path
    index_path: Path
    n_tokens: int
    vocab: Vocabulary
    _index: Any = field(default=None, repr=False)
    _tokens: np.ndarray | None = field(default=None, repr=False)
    _unigrams: np.ndarray | None = field(default=None, repr=False)
    # context -> its distinct next ids (separators as one), int32 sorted
    successors: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict, repr=False)
    # (panel digest, k, m, max_order) -> (window counts [N, k + m, max_order], window [N], suffix [N]): one panel kept
    spans: dict[Any, tuple[np.ndarray, ...]] = field(default_factory=dict, repr=False)

    @property
    def index(self) -> Any:
        if self._index is None:
            tokengrams = require_tokengrams()
            args = (os.fspath(self.tokens_path), os.fspath(self.index_path))
            if self.n_tokens <= IN_MEMORY_TOKENS:
                self._index = tokengrams.InMemoryIndex.from_disk(*args, vocab=self.vocab.vocab)
            else:
                self._index = tokengrams.MemmapIndex(*args, vocab=self.vocab.vocab)
        return self._index

    @property
    def tokens(self) -> np.ndarray:
        """The shard's tokens [n_tokens], memory-mapped (a plain ndarray view: fancy indexing stays fast)."""
        if self._tokens is None:
            mapped = np.memmap(self.tokens_path, dtype=self.vocab.dtype, mode="r", shape=(self.n_tokens,))
            self._tokens = np.asarray(mapped)
        return self._tokens

    def unigrams(self) -> np.ndarray:
        """int64 [vocab]: how often each id occurs (every separator id too), counted once in chunks."""
        if self._unigrams is None:
            out = np.zeros(self.vocab.vocab, np.int64)
            step = 1 << 24
            for start in range(0, self.n_tokens, step):
                out += np.bincount(self.tokens[start : start + step], minlength=self.vocab.vocab)
            self._unigrams = out
        return self._unigrams

    def next_ids(self, query: list[int]) -> np.ndarray:
        """The distinct ids that follow `query` in this shard (separators as one), int32 sorted; cached."""
        key = tuple(query)
        hit = self.successors.get(key)
        if hit is None:
            c = int(self.index.count(query))
            if c == 0:
                hit = np.zeros(0, np.int32)
            elif c <= POSITIONS_LIMIT:
                starts = np.asarray(self.index.positions(query), dtype=np.int64)
                nxt = np.minimum(
                    self.tokens[starts + len(query)], self.vocab.separator
                )  # every separator is one
                hit = np.unique(nxt).astype(np.int32)
            else:
                hit = np.flatnonzero(self.vocab.collapse(self.index.count_next(query))).astype(np.int32)
            self.successors[key] = hit
        return hit

    @classmethod
    def merged(cls, a: Part, b: Part, tokens_path: Path, index_path: Path) -> Part:
        """The shard holding a's documents then b's, with what both had cached combined (counts add, successor sets
        unite: no n-gram spans the two)."""
        part = cls(tokens_path, index_path, a.n_tokens + b.n_tokens, a.vocab)
        if a._unigrams is not None and b._unigrams is not None:
            part._unigrams = a._unigrams + b._unigrams
        for key in a.successors.keys() & b.successors.keys():
            part.successors[key] = np.union1d(a.successors[key], b.successors[key]).astype(np.int32)
        for key in a.spans.keys() & b.spans.keys():
            (ca, wa, sa), (cb, wb, sb) = a.spans[key], b.spans[key]
            part.spans[key] = (np.where(ca >= 0, ca + cb, -1), wa + wb, sa + sb)
        return part

    def close(self) -> None:
        self._index = self._tokens = None


class CorpusIndex:
    """Exact n-gram counts over one or more shards (NgramSource): a count is the sum of the shards' counts, since
    shards hold whole documents and no n-gram crosses a separator. Queries with an id outside the vocabulary count 0;
    the separators count as one id, `vocabulary.separator`, in count_next and the unigram counts.
    `version` names the shards, so products computed from the counts can be cached until it changes."""

    def __init__(self, parts: Sequence[Part], vocab: Vocabulary, version: Any = None) -> None:
        self.parts = [p for p in parts if p.n_tokens > 0]
        self.vocabulary = vocab
        self.vocab = vocab.logical  # count_next's length: the token ids and one separator
        self.version = version
        self._unigrams: np.ndarray | None = None

    def total(self) -> int:
        return sum(p.n_tokens for p in self.parts)

    def _valid(self, query: Sequence[int]) -> list[int] | None:
        q = [int(t) for t in query]
        return q if all(0 <= t < self.vocabulary.size for t in q) else None

    def count(self, tokens: Sequence[int]) -> int:
        q = self._valid(tokens)
        if q is None:
            return 0
        if not q:
            return self.total()
        return sum(int(p.index.count(q)) for p in self.parts)

    def batch_count(self, queries: Sequence[Sequence[int]]) -> np.ndarray:
        """int64 [len(queries)]."""
        return np.fromiter((self.count(q) for q in queries), dtype=np.int64, count=len(queries))

    def count_next(self, tokens: Sequence[int]) -> np.ndarray:
        """int64 [vocab]: how often each id (the separators last, as one) directly follows the query."""
        q = self._valid(tokens)
        out = np.zeros(self.vocab, np.int64)
        if q is None:
            return out
        if not q:
            return self.unigram_counts().copy()
        for p in self.parts:
            out += self.vocabulary.collapse(p.index.count_next(q))
        return out

    def batch_count_next(self, queries: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return [self.count_next(q) for q in queries]

    def unigram_counts(self) -> np.ndarray:
        """int64 [vocab]: every id's count (the separators as one), from the shards' tokens (cached)."""
        if self._unigrams is None:
            out = np.zeros(self.vocab, np.int64)
            for p in self.parts:
                out += self.vocabulary.collapse(p.unigrams())
            self._unigrams = out
        return self._unigrams

    def distinct_next(self, queries: Sequence[Sequence[int]]) -> np.ndarray:
        """int64 [len(queries)]: how many distinct ids follow each query (Kneser-Ney's N1+(q .)), the union over
        shards (Part.next_ids: the occurrences' next tokens up to POSITIONS_LIMIT occurrences, count_next above)."""
        out = np.zeros(len(queries), np.int64)
        for i, query in enumerate(queries):
            q = self._valid(query)
            if q is None:
                continue
            if not q:
                out[i] = int(np.count_nonzero(self.unigram_counts()))
                continue
            seen = [ids for ids in (p.next_ids(q) for p in self.parts) if len(ids)]
            if len(seen) == 1:
                out[i] = len(seen[0])
            elif seen:
                out[i] = len(np.unique(np.concatenate(seen)))
        return out

    def span_counts(self, tokens: np.ndarray, k: int, m: int, max_order: int) -> tuple[np.ndarray, ...]:
        """(window counts [N, k + m, max_order], window [N], suffix [N]) of a panel (memwatch.corpus.stats), the sum of
        each shard's, which each shard keeps for the panel it was last asked about."""
        from memwatch.corpus.stats import direct_span_counts

        tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
        n = len(tokens)
        key = (hashlib.sha1(tokens.tobytes()).hexdigest(), k, m, max_order)
        total = (np.full((n, k + m, max_order), -1, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64))
        for j, p in enumerate(self.parts):
            got = p.spans.get(key)
            if got is None:
                got = direct_span_counts(CorpusIndex([p], self.vocabulary), tokens, k, m, max_order)
                p.spans.clear()  # one panel a run: the previous one is not asked again
                p.spans[key] = got
            counts = got[0] if j == 0 else np.where(got[0] >= 0, total[0] + got[0], -1)
            total = (counts, total[1] + got[1], total[2] + got[2])
        if not self.parts:
            from memwatch.corpus.stats import window_counts

            total = (window_counts(self, tokens, max_order), total[1], total[2])
        return total

    def close(self) -> None:
        for p in self.parts:
            p.close()


class InfiniGramIndex:
    """An existing infini-gram index (Liu et al. 2024, the `infini-gram` package) serving counts through the same
    interface (NgramSource). Its counts may be approximate where infini-gram approximates (large next-token
    supports); `vocab` is the tokenizer's vocabulary size."""

    def __init__(self, index_dir: str | os.PathLike[str], *, vocab: int, eos_token_id: int = 0) -> None:
        try:
            from infini_gram.engine import InfiniGramEngine
        except ImportError as exc:
            raise MissingPackageError(
                "serving n-gram counts from an infini-gram index needs the optional package 'infini-gram', which is "
                "not installed: pip install infini-gram (or build memwatch's own index: "
                "pip install 'memwatch[ngrams]' and MonitorConfig(ngrams='dataset'))"
            ) from exc
        self.vocab = int(vocab)
        self.version = None  # an index built before the run: its counts do not change
        self.engine = InfiniGramEngine(index_dir=os.fspath(index_dir), eos_token_id=int(eos_token_id))

    def total(self) -> int:
        return int(self.engine.count(input_ids=[])["count"])

    def count(self, tokens: Sequence[int]) -> int:
        return int(self.engine.count(input_ids=[int(t) for t in tokens])["count"])

    def batch_count(self, queries: Sequence[Sequence[int]]) -> np.ndarray:
        return np.fromiter((self.count(q) for q in queries), dtype=np.int64, count=len(queries))

    def count_next(self, tokens: Sequence[int]) -> np.ndarray:
        out = np.zeros(self.vocab, np.int64)
        result = self.engine.ntd(prompt_ids=[int(t) for t in tokens])
        for token, entry in (result.get("result_by_token_id") or {}).items():
            if 0 <= int(token) < self.vocab:
                out[int(token)] = int(entry["cont_cnt"])
        return out

    def batch_count_next(self, queries: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return [self.count_next(q) for q in queries]
