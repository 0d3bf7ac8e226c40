"""Tokenizers, chosen by `tokenizer.name`. See base.py for the contract."""
from __future__ import annotations

from typing import Any

from llmtrain.tokenizers import char  # noqa: F401  (registers)
from llmtrain.tokenizers import byte  # noqa: F401  (registers)
from llmtrain.tokenizers import sentencepiece  # noqa: F401  (registers)
from llmtrain.tokenizers import hf  # noqa: F401  (registers)
from llmtrain.tokenizers.base import SPECIAL_TOKENS, Tokenizer

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "tokenizer_from_state"]


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    from llmtrain.registry import get

    return get("tokenizer", state["name"]).from_state(state)
