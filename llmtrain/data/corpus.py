"""Documents -> token arrays split into train / validation.

A single document (one text file, as in nanoGPT's Shakespeare) is split by position: the first
(1 - val_fraction) of its tokens train, the rest validate. Several documents are split by
document, so no document straddles the split. Each document ends with the eos token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmtrain.errors import UserError
from llmtrain.tokenizers import Tokenizer


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    n_docs: int
    val_bytes: int  # UTF-8 bytes of the validation text, for bits per byte


def _dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 2**16 else np.uint32


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    dtype = _dtype(tokenizer.vocab_size)
    return [np.asarray(ids + [tokenizer.eos_id], dtype=dtype) for ids in tokenizer.encode_batch(docs)]


def split_tokens(docs: list[str], tokenizer: Tokenizer, val_fraction: float) -> TokenSplits:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    encoded = tokenize_documents(docs, tokenizer)
    if len(encoded) == 1:
        toks = encoded[0]
        cut = int(len(toks) * (1 - val_fraction))
        train, val = toks[:cut], toks[cut:]
        # Bytes of the validation text: decode is exact for the tokenizers we ship.
        val_bytes = len(tokenizer.decode(val.tolist()).encode("utf-8"))
    else:
        n_val = int(round(len(encoded) * val_fraction))
        if val_fraction > 0:
            n_val = max(1, n_val)
        cut = len(encoded) - n_val
        train = np.concatenate(encoded[:cut]) if cut > 0 else np.zeros(0, dtype=encoded[0].dtype)
        val = np.concatenate(encoded[cut:]) if n_val else np.zeros(0, dtype=encoded[0].dtype)
        val_bytes = sum(len(d.encode("utf-8")) for d in docs[cut:])
    return TokenSplits(train=train, val=val, n_docs=len(docs), val_bytes=val_bytes)
