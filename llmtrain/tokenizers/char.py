"""Character-level tokenizer: the special tokens, then every character of the training corpus."""

from __future__ import annotations

from typing import Any

from llmtrain.registry import register
from llmtrain.tokenizers.base import SPECIAL_TOKENS, Tokenizer


@register("tokenizer", "char")
class CharTokenizer(Tokenizer):
    name = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.itos = list(SPECIAL_TOKENS.values()) + list(chars)
        self.stoi = {c: i for i, c in enumerate(chars, start=len(SPECIAL_TOKENS))}
        for i, key in enumerate(SPECIAL_TOKENS):
            setattr(self, f"{key}_id", i)
        self.vocab_size = len(self.itos)

    @classmethod
    def train(cls, texts, cfg=None) -> "CharTokenizer":
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls("".join(sorted(chars)))

    def encode(self, text: str) -> list[int]:
        unk, stoi = self.unk_id, self.stoi
        return [stoi.get(c, unk) for c in text]

    def decode(self, ids: list[int]) -> str:
        n = len(SPECIAL_TOKENS)
        # Special tokens are dropped from decoded text, except unk which shows as U+FFFD.
        return "".join(
            self.itos[i] if i >= n else ("\ufffd" if i == self.unk_id else "") for i in ids if 0 <= i < self.vocab_size
        )

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CharTokenizer":
        return cls(state["chars"])
