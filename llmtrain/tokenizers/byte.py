"""Byte-level tokenizer: the special tokens (ids 0..6), then the 256 byte values (ids 7..262).

Needs no training and never produces unk: any text round-trips exactly through UTF-8.
"""

from __future__ import annotations

from typing import Any

from llmtrain.registry import register
from llmtrain.tokenizers.base import SPECIAL_TOKENS, Tokenizer

_OFFSET = len(SPECIAL_TOKENS)


@register("tokenizer", "byte")
class ByteTokenizer(Tokenizer):
    name = "byte"

    def __init__(self) -> None:
        for i, key in enumerate(SPECIAL_TOKENS):
            setattr(self, f"{key}_id", i)
        self.vocab_size = _OFFSET + 256

    @classmethod
    def train(cls, texts=None, cfg=None) -> "ByteTokenizer":
        return cls()

    def encode(self, text: str) -> list[int]:
        return [b + _OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        # Special tokens and ids outside the vocabulary (a model's padded vocab) are dropped.
        data = bytes(i - _OFFSET for i in ids if _OFFSET <= i < _OFFSET + 256)
        return data.decode("utf-8", errors="replace")

    def state(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ByteTokenizer":
        return cls()
