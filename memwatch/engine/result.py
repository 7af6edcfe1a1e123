"""ExtractionResult: the per-sequence results of an extraction (numpy only, so reading a history needs no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["ExtractionResult"]


@dataclass(frozen=True)
class ExtractionResult:
    """Per-sequence results of `extract`, numpy arrays in input row order.

    `generated`, `match_ratio`, `match_count` and `edit_similarity` are None in mode "exact" (no free decoding).
    Entropy column j is the entropy (nats) of the distribution predicting token k - w + j: teacher-forced on the
    true sequence for j < w, along the greedy path for j >= w (teacher-forced on the true suffix in mode "exact").
    `decoding` says how the rows that diverged from their suffix were decoded: "cache-reuse" (from the
    teacher-forced pass's cache), "recompute" (by `generate`, for models whose cache cannot be reused), both
    joined by "+" when batches differed, "none" when nothing was decoded, "unknown" when not recorded.
    """

    prefix_len: int
    suffix_len: int
    entropy_window: int
    mode: str
    generated: np.ndarray | None  # int64 [N, m]
    exact: np.ndarray  # bool [N]
    match_ratio: np.ndarray | None  # float32 [N]
    match_count: np.ndarray | None  # int64 [N]: matching positions (match_ratio = match_count / m)
    prefix_match_len: np.ndarray  # int64 [N]
    edit_similarity: np.ndarray | None  # float32 [N]
    entropy: np.ndarray  # float32 [N, w + m]
    suffix_nll: np.ndarray  # float32 [N]
    near_tie: np.ndarray  # bool [N]
    decoding: str = "unknown"
    # With extract(token_stats=True), per token of the window (column j: the token at position j + 1, predicted
    # from positions 0..j, teacher-forced): log p of the true token, and the mean sum_v p log p and variance of
    # log p under the model's next-token distribution there (min-k%++'s standardisation). None otherwise.
    token_logprobs: np.ndarray | None = None  # float32 [N, k + m - 1]
    token_logp_mean: np.ndarray | None = None  # float32 [N, k + m - 1]
    token_logp_var: np.ndarray | None = None  # float32 [N, k + m - 1]

    # With extract(hidden_prefix=True): the last layer's hidden state mean-pooled over the k prefix positions (the
    # embedding view), float16.
    hidden_prefix: np.ndarray | None = None  # float16 [N, H]

    TOKEN_FIELDS = ("token_logprobs", "token_logp_mean", "token_logp_var")
    ARRAY_FIELDS = (
        "generated",
        "exact",
        "match_ratio",
        "match_count",
        "prefix_match_len",
        "edit_similarity",
        "entropy",
        "suffix_nll",
        "near_tie",
        *TOKEN_FIELDS,
        "hidden_prefix",
    )

    def __len__(self) -> int:
        return int(self.exact.shape[0])

    def select(self, rows: np.ndarray | Sequence[int] | slice) -> ExtractionResult:
        """The result restricted to `rows` (indices, a boolean mask or a slice), in that order."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self.ARRAY_FIELDS:
            value = kw[name]
            kw[name] = None if value is None else value[rows]
        return ExtractionResult(**kw)

    @classmethod
    def concat(cls, parts: Sequence[ExtractionResult]) -> ExtractionResult:
        """Stack results computed with the same settings, rows in the order given."""
        if not parts:
            raise ValueError("concat needs at least one ExtractionResult")
        first = parts[0]
        kw = {f.name: getattr(first, f.name) for f in fields(first)}
        for p in parts[1:]:
            if (p.prefix_len, p.suffix_len, p.entropy_window, p.mode) != (
                first.prefix_len,
                first.suffix_len,
                first.entropy_window,
                first.mode,
            ):
                raise ValueError("concat: results differ in prefix_len, suffix_len, entropy_window or mode")
        for name in cls.ARRAY_FIELDS:
            values = [getattr(p, name) for p in parts]
            kw[name] = None if values[0] is None else np.concatenate(values, axis=0)
        kw["decoding"] = cls.combine_decodings(p.decoding for p in parts)
        return ExtractionResult(**kw)

    @staticmethod
    def combine_decodings(paths: Iterable[str]) -> str:
        """One `decoding` label for rows decoded in several parts: the paths that decoded anything, joined by "+"."""
        used = sorted({path for label in paths for path in label.split("+")} - {"none"})
        return "+".join(used) if used else "none"
