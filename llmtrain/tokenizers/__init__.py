"""Tokenizers, chosen by `tokenizer.name`. See base.py for the contract."""

from __future__ import annotations

from typing import Any

from llmtrain import registry
from llmtrain.tokenizers import (
    byte,  # noqa: F401  (registers)
    char,  # noqa: F401  (registers)
    hf,  # noqa: F401  (registers)
    hf_train,  # noqa: F401  (registers wordpiece, bpe)
    sentencepiece,  # noqa: F401  (registers)
)
from llmtrain.tokenizers.base import SPECIAL_TOKENS, Tokenizer

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "build_tokenizer", "tokenizer_class", "tokenizer_from_state"]


def tokenizer_class(name: str) -> type[Tokenizer]:
    return registry.get("tokenizer", name)


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """A tokenizer as a checkpoint stores it (Tokenizer.state())."""
    return tokenizer_class(state["name"]).from_state(state)


def build_tokenizer(cfg, texts, *, default_path=None):
    """The tokenizer a TokenizerConfig asks for; `texts` (a function returning documents) is only
    called when one has to be trained. See llmtrain/tokenizers/train.py."""
    from llmtrain.tokenizers.train import build_tokenizer as build

    return build(cfg, texts, default_path=default_path)
