"""Probes and panels: content ids, sampling windows from datasets with a private RNG, user probes."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "GROUP_ORDER",
    "Panel",
    "Probe",
    "TokenMatcher",
    "example_tokens",
    "probe_id",
    "probes_from_user",
    "rng_guard",
    "sample_windows",
    "sequence_starts",
]

log = logging.getLogger("memwatch")

# DESIGN.md §2 groups, in the order panels list them and a duplicate window keeps the first.
GROUP_ORDER = ("canary", "canary_heldout", "train", "heldout")
IGNORE_INDEX = -100  # the label value Hugging Face losses skip


def probe_id(tokens: Sequence[int]) -> str:
    """Content id of a token sequence: the first 16 hex digits of SHA-256 over its int32 little-endian bytes."""
    return hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Probe:
    """A token sequence of at least k + m tokens with a content id, a group and metadata (e.g. a canary's tier)."""

    tokens: tuple[int, ...]
    group: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group:
            raise ValueError(f"a probe's group must be a non-empty string; got {self.group!r}")
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "id", probe_id(self.tokens))


class Panel:
    """An ordered, de-duplicated set of probes, fixed for a run so that transitions are measurable."""

    def __init__(self, probes: Iterable[Probe] = ()) -> None:
        self.probes: list[Probe] = []
        self._index: dict[str, int] = {}
        self.duplicates = 0
        for p in probes:
            self.add(p)

    def add(self, probe: Probe) -> bool:
        """Add a probe unless its content is already in the panel (the earlier group wins). True if added."""
        if probe.id in self._index:
            self.duplicates += 1
            return False
        self._index[probe.id] = len(self.probes)
        self.probes.append(probe)
        return True

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.probes]

    @property
    def groups(self) -> np.ndarray:
        return np.array([p.group for p in self.probes], dtype=object)

    def group_names(self) -> list[str]:
        """Groups present, DESIGN.md's four first, then user groups in order of appearance."""
        present = list(dict.fromkeys(p.group for p in self.probes))
        return [g for g in GROUP_ORDER if g in present] + [g for g in present if g not in GROUP_ORDER]

    def tokens(self, length: int) -> np.ndarray:
        """The first `length` tokens of every probe, int64 [N, length]."""
        if not self.probes:
            return np.zeros((0, length), dtype=np.int64)
        return np.array([p.tokens[:length] for p in self.probes], dtype=np.int64)

    def filter_short(self, length: int) -> int:
        """Drop probes shorter than `length` tokens; returns how many were dropped."""
        keep = [p for p in self.probes if len(p.tokens) >= length]
        dropped = len(self.probes) - len(keep)
        if dropped:
            self.probes = keep
            self._index = {p.id: i for i, p in enumerate(keep)}
        return dropped


@contextlib.contextmanager
def rng_guard() -> Iterator[None]:
    """Run a block and restore every global RNG it may touch: Python's, NumPy's, torch CPU and CUDA."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = cuda_state = None
    try:
        import torch

        torch_state = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_state = torch.cuda.get_rng_state_all()
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None  # type: ignore[assignment]
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if torch is not None and torch_state is not None:
            torch.set_rng_state(torch_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)


def _to_list(value: Any) -> list[int] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple) and value and isinstance(value[0], list | tuple):
        value = value[0]  # a batch of one
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        return None


def example_tokens(
    example: Any, collator: Callable[[list[Any]], Any] | None = None, *, with_real: bool = False
) -> Any:
    """(input_ids, trained) of one dataset example; trained[i] says whether token i receives loss.

    The collator, when given, is the authority (completion-only SFT collators mask the prompt there); it is
    called on a batch of one under rng_guard. Otherwise dataset labels (!= -100) decide, and padding
    (attention_mask == 0) never counts. None if the example holds no token ids. with_real=True adds a third list:
    which tokens are real text (not padding).
    """
    if isinstance(example, Mapping):
        ids = _to_list(example.get("input_ids"))
        labels = _to_list(example.get("labels"))
        attn = _to_list(example.get("attention_mask"))
    else:
        ids, labels, attn = _to_list(example), None, None
    if not ids:
        return None
    trained = [True] * len(ids)
    if labels is not None and len(labels) == len(ids):
        trained = [lab != IGNORE_INDEX for lab in labels]
    if collator is not None and isinstance(example, Mapping):
        collated = _collated_labels(collator, example, ids)
        if collated is not None:
            trained = collated
    real = [bool(a) for a in attn] if attn is not None and len(attn) == len(ids) else [True] * len(ids)
    trained = [t and r for t, r in zip(trained, real, strict=True)]
    return (ids, trained, real) if with_real else (ids, trained)


def _collated_labels(
    collator: Callable[[list[Any]], Any], example: Mapping, ids: list[int]
) -> list[bool] | None:
    try:
        with rng_guard():
            batch = collator([dict(example)])
    except (
        Exception
    ) as exc:  # a collator that cannot take a single example: fall back to the dataset's labels
        log.debug("memwatch: collator failed on a single example (%s); using dataset labels", exc)
        return None
    if not isinstance(batch, Mapping) or "labels" not in batch:
        return None
    labels = _to_list(batch["labels"])
    got = _to_list(batch.get("input_ids"))
    if labels is None or got is None or len(labels) != len(got):
        return None
    # Find the example inside the (possibly padded) collated row.
    n = len(ids)
    for offset in (0, len(got) - n):
        if offset >= 0 and got[offset : offset + n] == ids:
            # Causal LM labels are the input ids (shifted inside the model): token i is trained iff labels[i] != -100.
            return [lab != IGNORE_INDEX for lab in labels[offset : offset + n]]
    return None


def sequence_starts(example: Any) -> list[int]:
    """Where the sequences packed into one example begin: [0] for a plain example; from `seq_lengths` (TRL's
    packing) or the zeros of `position_ids` (padding-free batches) when the example has them. Tokens of two
    packed sequences never attend to each other, so no probe window may cross such a boundary."""
    if not isinstance(example, Mapping):
        return [0]
    lengths = _to_list(example.get("seq_lengths"))
    if lengths:
        return [0, *np.cumsum(lengths[:-1]).astype(int).tolist()]
    positions = _to_list(example.get("position_ids"))
    if positions:
        return [0, *(i for i, p in enumerate(positions) if p == 0 and i > 0)]
    return [0]


class TokenMatcher:
    """Finds occurrences of a set of token sequences (e.g. canary secrets) in token arrays, fast: candidate
    positions come from a vectorised look-up of each pattern's first two tokens."""

    def __init__(self, patterns: Iterable[Sequence[int]]) -> None:
        self.patterns = [
            np.asarray(p, dtype=np.int64) for p in dict.fromkeys(tuple(p) for p in patterns) if p
        ]
        self._base = int(max((int(p.max()) for p in self.patterns), default=0)) + 1
        self._by_key: dict[int, list[np.ndarray]] = {}
        for p in self.patterns:
            self._by_key.setdefault(self._key(p), []).append(p)
        self._keys = np.fromiter(self._by_key, dtype=np.int64)

    def _key(self, p: np.ndarray) -> int:
        # A one-token pattern is keyed by its token alone, in a range two-token keys never reach.
        return int(p[0]) * self._base + int(p[1]) if len(p) > 1 else -1 - int(p[0])

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def find(self, tokens: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
        """(start, end) of every occurrence of a pattern in `tokens`."""
        if not self.patterns:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size == 0:
            return []
        known = arr < self._base  # a token beyond every pattern's ids starts no pattern
        keys = np.full(len(arr), np.iinfo(np.int64).min, dtype=np.int64)
        pair = known[:-1] & known[1:]
        keys[:-1][pair] = arr[:-1][pair] * self._base + arr[1:][pair]
        found: list[tuple[int, int]] = []
        for key_array in (keys, np.where(known, -1 - arr, np.iinfo(np.int64).min)):
            for h in np.flatnonzero(np.isin(key_array, self._keys)).tolist():
                for p in self._by_key[int(key_array[h])]:
                    if h + len(p) <= len(arr) and np.array_equal(arr[h : h + len(p)], p):
                        found.append((h, h + len(p)))
        return found

    def blocked(self, tokens: Sequence[int], starts: Sequence[int]) -> list[bool]:
        """Per token: whether it belongs to a (packed) sequence holding an occurrence of a pattern."""
        n = len(tokens)
        out = [False] * n
        hits = self.find(tokens)
        if not hits:
            return out
        bounds = [*starts, n]
        for lo, hi in itertools.pairwise(bounds):
            if any(s < hi and e > lo for s, e in hits):
                out[lo:hi] = [True] * (hi - lo)
        return out


def _window_starts(
    trained: list[bool], real: list[bool], n_tokens: int, k: int, m: int, starts: Sequence[int] = (0,)
) -> list[int]:
    """Starts s with s + k + m <= len whose suffix [s+k, s+k+m) is entirely trained, whose whole window is real
    text (no padding, nothing excluded) and lies inside one packed sequence."""
    if n_tokens < k + m:
        return []
    untrained = np.cumsum([0] + [not t for t in trained])  # untrained[i] = untrained tokens before i
    padding = np.cumsum([0] + [not r for r in real])
    boundary = np.zeros(n_tokens + 1, dtype=np.int64)
    inner = [b for b in starts if 0 < b < n_tokens]
    boundary[np.asarray(inner, dtype=np.int64) + 1] = 1
    boundary = np.cumsum(boundary)  # boundary[i] = sequence starts at positions 1..i-1
    s = np.arange(0, n_tokens - (k + m) + 1)
    ok = (
        (untrained[s + k + m] - untrained[s + k] == 0)
        & (padding[s + k + m] - padding[s] == 0)
        & (boundary[s + k + m] - boundary[s + 1] == 0)  # no sequence starts at s+1 .. s+k+m-1
    )
    return s[ok].tolist()


def sample_windows(
    dataset: Any,
    n: int,
    *,
    prefix_len: int,
    suffix_len: int,
    group: str,
    seed: int,
    collator: Callable[[list[Any]], Any] | None = None,
    window: str = "first",
    scan_limit: int | None = None,
    exclude: Iterable[Sequence[int]] = (),
) -> list[Probe]:
    """Sample up to n windows of k + m tokens from a tokenized dataset, deterministically for a seed.

    Examples are visited in a seeded random order (a private numpy Generator: the training RNG is untouched)
    and contribute one window each among the windows whose suffix lies in trained tokens: the earliest one
    (window="first": the sequence as the model saw it, at the same positions and with no context cut off;
    Pythia's convention, and the start of the completion under completion-only SFT) or a uniformly random one
    (window="random"). Later rounds take further, non-overlapping windows from the same examples if the dataset
    is small. Iterable datasets without a length are read from the start, up to `scan_limit` examples
    (default 20 n). Windows never cross the boundary of two packed sequences (`seq_lengths`, `position_ids`).
    `exclude`: token sequences (canary secrets and contexts) whose example, or packed sequence within an
    example, is never sampled, so that text inserted on purpose does not count as ordinary training data.
    """
    if window not in ("first", "random"):
        raise ValueError(f"window must be 'first' or 'random'; got {window!r}")
    if n <= 0 or dataset is None:
        return []
    rng = np.random.default_rng([seed, 0x6D656D])  # private stream, distinct per seed
    k, m = prefix_len, suffix_len
    length = k + m
    examples: list[Any]
    try:
        size = len(dataset)
        order = rng.permutation(size).tolist()
        get: Callable[[int], Any] = dataset.__getitem__
    except TypeError:
        limit = scan_limit or 20 * n
        with rng_guard():
            examples = []
            for i, ex in enumerate(dataset):
                if i >= limit:
                    break
                examples.append(ex)
        order = rng.permutation(len(examples)).tolist()
        get = examples.__getitem__
    matcher = TokenMatcher(exclude)
    probes: list[Probe] = []
    seen: set[str] = set()
    taken: dict[int, set[int]] = {}
    candidates: dict[int, tuple[list[int], list[int]]] = {}
    for round_ in range(4):  # later rounds revisit examples that still have unused windows
        for idx in order:
            if len(probes) >= n:
                return probes
            if round_ == 0:
                example = get(idx)
                parsed = example_tokens(example, collator, with_real=True)
                if parsed is None:
                    continue
                ids, trained, real = parsed
                seq_starts = sequence_starts(example)
                if matcher:  # a sequence holding canary text is not ordinary training data
                    blocked = matcher.blocked(ids, seq_starts)
                    real = [r and not b for r, b in zip(real, blocked, strict=True)]
                starts = _window_starts(trained, real, len(ids), k, m, seq_starts)
                if not starts:
                    continue
                candidates[idx] = (ids, starts)
            elif idx not in candidates:
                continue
            ids, starts = candidates[idx]
            used = taken.setdefault(idx, set())
            free = [s for s in starts if all(abs(s - u) >= length for u in used)]
            if not free:
                continue
            first_round_first = round_ == 0 and window == "first"
            s = free[0] if first_round_first else free[int(rng.integers(len(free)))]
            probe = Probe(tuple(ids[s : s + length]), group, {"source_index": int(idx), "start": int(s)})
            used.add(s)  # a duplicate's window counts as used too: later rounds stay non-overlapping
            if probe.id in seen:
                continue
            seen.add(probe.id)
            probes.append(probe)
        if len(probes) >= n or not candidates:
            break
    return probes


def probes_from_user(
    items: Iterable[Any],
    *,
    tokenizer: Any = None,
    default_group: str = "user",
) -> list[Probe]:
    """Probes from what a user passes: texts, token-id lists, or dicts {"text"|"input_ids", "group", "meta"}.

    A dict's `attention_mask`, when present, drops its padding (attention_mask == 0) from the probe's tokens."""
    out: list[Probe] = []
    for i, item in enumerate(items):
        group, meta = default_group, {}
        if isinstance(item, Probe):
            out.append(item)
            continue
        mask = None
        if isinstance(item, Mapping):
            group = item.get("group", default_group)
            meta = dict(item.get("meta", {}))
            if "id" in item:
                meta["user_id"] = item["id"]
            mask = _to_list(item.get("attention_mask")) if "input_ids" in item else None
            item = item.get("input_ids", item.get("text"))
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(
                    f"probe {i} is text but no tokenizer is available; pass token ids instead, or give the Trainer "
                    "a processing_class / the callback a tokenizer."
                )
            ids = list(tokenizer(item, add_special_tokens=False)["input_ids"])
        else:
            ids = _to_list(item)
            if ids is None:
                raise ValueError(
                    f"probe {i} must be a text, a list of token ids or a dict; got {type(item).__name__}"
                )
            if mask is not None and len(mask) == len(ids):  # padding (left or right) is not probe text
                ids = [t for t, keep in zip(ids, mask, strict=True) if keep]
        out.append(Probe(tuple(ids), group, meta))
    return out
