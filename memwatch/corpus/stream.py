"""The index streamed from the training batches: token shards appended as batches pass, indexed as they are sealed."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memwatch.corpus.build import documents_of_batch
from memwatch.corpus.index import CorpusIndex, Part, Vocabulary, build_part, require_tokengrams

__all__ = ["MAX_PART_TOKENS", "MERGE_RATIO", "SEAL_TOKENS", "StreamingIndex"]

log = logging.getLogger("memwatch")

# Batches wait in memory until 2^22 tokens (8-16 MiB) have passed, or an evaluation needs them counted, then are
# written and indexed as a new shard: a small shard sorts in well under a second.
SEAL_TOKENS = 1 << 22
# A shard merges with the one before it while that one is at most twice its size (a binary counter), so a run of T
# tokens keeps about log2(T / SEAL_TOKENS) shards and every token is re-sorted about as often: queries stay a
# handful of binary searches, the merging costs O(T log T) over the run.
MERGE_RATIO = 2
# ...but no shard grows past 2^28 tokens (sorting one holds its 2 GiB table in memory).
MAX_PART_TOKENS = 1 << 28
_MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class _Shard:
    name: str
    tokens: int
    # (end offset in tokens, the last optimizer step whose batches end there): where the shard may be cut on resume
    segments: list[tuple[int, int]] = field(default_factory=list)


class StreamingIndex:
    """The tokens the model has seen so far: `add` takes each batch's input_ids and attention_mask (padding never
    counted; each row, or each attended stretch of it, a document), `seal(step)` indexes what is pending as a new
    shard. Repetitions across epochs count as often as they are seen. Shards, their suffix arrays and a manifest live
    in `directory` (crash-safe: the manifest is replaced atomically, files it does not list are removed when
    opened); `truncate(step)` drops what came after a checkpoint's step, so a resumed run counts each batch once."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        vocab: Vocabulary,
        *,
        seal_tokens: int = SEAL_TOKENS,
        max_part_tokens: int = MAX_PART_TOKENS,
    ) -> None:
        require_tokengrams()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vocab = vocab
        self.seal_tokens = seal_tokens
        self.max_part_tokens = max_part_tokens
        self.shards: list[_Shard] = []
        self.serial = 0
        self.generation = 0  # bumped whenever the sealed shards change (the index's version)
        self._pending: list[np.ndarray] = []  # documents, each already followed by its separator
        self.documents = 0  # documents added (numbers their separators)
        self.pending_tokens = 0
        self._parts: dict[str, Part] = {}
        self._load()

    # --- adding -------------------------------------------------------------------------------------------------

    def add(self, input_ids: Any, attention_mask: Any = None) -> int:
        """Append one batch's documents (input_ids [B, T], attention_mask [B, T] or None); returns tokens added."""
        return self.add_documents(documents_of_batch(input_ids, attention_mask))

    def add_documents(self, documents: Sequence[np.ndarray]) -> int:
        added = 0
        for doc in documents:
            doc = np.asarray(doc, dtype=np.int64)
            if not doc.size:
                continue
            if int(doc.min()) < 0 or int(doc.max()) >= self.vocab.size:
                raise ValueError(
                    f"a batch holds token id {int(doc.max())} (or {int(doc.min())}), outside the model's vocabulary of "
                    f"{self.vocab.size} ids"
                )
            sep = int(self.vocab.separators(self.documents, 1)[0])
            self.documents += 1
            self._pending.append(np.r_[doc, sep].astype(self.vocab.dtype))
            added += doc.size + 1
        self.pending_tokens += added
        return added

    def add_flat(self, flat: np.ndarray) -> int:
        """Append documents already laid out with their separators (what another rank gathered)."""
        flat = np.asarray(flat).astype(self.vocab.dtype, copy=False)
        if flat.size:
            self._pending.append(flat)
            self.pending_tokens += int(flat.size)
        return int(flat.size)

    def take_pending(self) -> np.ndarray:
        """The pending documents as one flat array (with separators), removed from this index (a rank other than
        0 sends them to rank 0)."""
        flat = np.concatenate(self._pending) if self._pending else np.zeros(0, self.vocab.dtype)
        self._pending, self.pending_tokens = [], 0
        return flat

    def maybe_seal(self, step: int) -> bool:
        """Seal when the pending batches reach seal_tokens (call at step boundaries: shards end between steps)."""
        return self.seal(step) if self.pending_tokens >= self.seal_tokens else False

    def seal(self, step: int) -> bool:
        """Write and index the pending batches as a new shard whose batches end at optimizer step `step`, then merge
        (MERGE_RATIO); True if the index changed."""
        if not self.pending_tokens:
            return False
        flat = self.take_pending()
        name = self._name()
        flat.tofile(self.directory / f"{name}.bin")
        build_part(self.directory / f"{name}.bin", self.directory / f"{name}.idx", self.vocab)
        self.shards.append(_Shard(name, int(flat.size), [(int(flat.size), int(step))]))
        while len(self.shards) >= 2:
            a, b = self.shards[-2], self.shards[-1]
            if a.tokens > MERGE_RATIO * b.tokens or a.tokens + b.tokens > self.max_part_tokens:
                break
            self.shards[-2:] = [self._merge(a, b)]
        self._commit()
        return True

    def _merge(self, a: _Shard, b: _Shard) -> _Shard:
        name = self._name()
        with open(self.directory / f"{name}.bin", "wb") as out:
            for part in (a, b):
                with open(self.directory / f"{part.name}.bin", "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        build_part(self.directory / f"{name}.bin", self.directory / f"{name}.idx", self.vocab)
        segments = a.segments + [(end + a.tokens, s) for end, s in b.segments]
        self._parts[name] = Part.merged(
            self._part(a), self._part(b), self.directory / f"{name}.bin", self.directory / f"{name}.idx"
        )
        return _Shard(name, a.tokens + b.tokens, segments)

    def _name(self) -> str:
        self.serial += 1
        return f"shard-{self.serial:06d}"

    # --- resuming -----------------------------------------------------------------------------------------------

    def truncate(self, step: int) -> int:
        """Keep what the batches of optimizer steps <= `step` added (a run resumed from that checkpoint sees the
        later ones again); pending batches are dropped. Returns the tokens removed."""
        self._pending, self.pending_tokens = [], 0
        removed = 0
        kept: list[_Shard] = []
        for shard in self.shards:
            segments = [(end, s) for end, s in shard.segments if s <= step]
            if len(segments) == len(shard.segments):
                kept.append(shard)
                continue
            cut = segments[-1][0] if segments else 0
            removed += shard.tokens - cut
            if cut:
                name = self._name()
                tokens = np.fromfile(self.directory / f"{shard.name}.bin", dtype=self.vocab.dtype, count=cut)
                tokens.tofile(self.directory / f"{name}.bin")
                build_part(self.directory / f"{name}.bin", self.directory / f"{name}.idx", self.vocab)
                kept.append(_Shard(name, cut, segments))
        if removed:
            self.shards = kept
            self._commit()
        return removed

    def clear(self) -> None:
        """Forget everything (a new run under the same output directory)."""
        self._pending, self.pending_tokens = [], 0
        if self.shards:
            self.shards = []
            self._commit()

    # --- reading ------------------------------------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        """Tokens indexed (sealed), separators included."""
        return sum(s.tokens for s in self.shards)

    def _part(self, shard: _Shard) -> Part:
        part = self._parts.get(shard.name)
        if part is None:
            path = self.directory / shard.name
            part = Part(path.with_suffix(".bin"), path.with_suffix(".idx"), shard.tokens, self.vocab)
            self._parts[shard.name] = part
        return part

    @property
    def index(self) -> CorpusIndex:
        """The sealed shards' counts (NgramSource); its `version` changes whenever they do."""
        parts = [self._part(shard) for shard in self.shards]
        return CorpusIndex(parts, self.vocab, version=("stream", str(self.directory), self.generation))

    # --- the manifest -------------------------------------------------------------------------------------------

    def _commit(self) -> None:
        """Write the manifest atomically, then remove the files it no longer lists."""
        self.generation += 1
        manifest = {
            "format": FORMAT,
            "vocab_size": self.vocab.size,
            "serial": self.serial,
            "shards": [{"name": s.name, "tokens": s.tokens, "segments": s.segments} for s in self.shards],
        }
        tmp = self.directory / f"{_MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, self.directory / _MANIFEST)
        self._remove_unlisted()

    def _remove_unlisted(self) -> None:
        listed = {s.name for s in self.shards}
        for name in list(self._parts):
            if name not in listed:
                self._parts.pop(name).close()
        for path in self.directory.glob("shard-*"):
            if path.stem not in listed:
                path.unlink(missing_ok=True)

    def _load(self) -> None:
        path = self.directory / _MANIFEST
        if not path.exists():
            self._remove_unlisted()
            return
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("vocab_size") != self.vocab.size:
            log.warning(
                "memwatch: the streamed n-gram index in %s has another format or vocabulary; starting it afresh",
                self.directory,
            )
            self.shards = []
            self._commit()
            return
        self.serial = int(manifest["serial"])
        self.shards = [
            _Shard(s["name"], int(s["tokens"]), [(int(e), int(st)) for e, st in s["segments"]])
            for s in manifest["shards"]
        ]
        self._remove_unlisted()

    def close(self) -> None:
        for part in self._parts.values():
            part.close()
        self._parts.clear()
