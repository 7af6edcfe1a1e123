"""A byte-level tokenizer (ids 0-255, one spare id) for the demo and tests: no downloads, exact round trips."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Text <-> UTF-8 bytes, with the call and decode signatures of a Hugging Face tokenizer."""

    name_or_path = "memwatch/bytes"
    vocab_size = 257  # 256 byte values and a spare id (used as the pad token)
    pad_token_id = 256
    eos_token_id = None
    bos_token_id = None
    all_special_ids: list[int] = [256]  # noqa: RUF012 - read-only, as on HF tokenizers
    padding_side = "right"

    def __call__(
        self, text: str | Sequence[str], add_special_tokens: bool = False, **_: Any
    ) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": list(text.encode("utf-8"))}
        return {"input_ids": [list(t.encode("utf-8")) for t in text]}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, **_: Any) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size
