"""The tokenizer contract shared by every stage.

Special tokens are defined once here; every tokenizer exposes their ids, so objectives
(CLM end-of-document, MLM [MASK], NSP [CLS]/[SEP]) and tasks never hard-code numbers.
A tokenizer round-trips through `state()` (JSON-serialisable, stored in checkpoints) and
`from_state()`; `fingerprint()` identifies it for data caches.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<s>",
    "eos": "</s>",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
}


class Tokenizer:
    name: str = "base"
    vocab_size: int
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    cls_id: int
    sep_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def piece_id(self, piece: str) -> int | None:
        """The id of the single token spelled `piece` (e.g. T5's "<extra_id_0>"), None if none."""
        return None

    @property
    def special_ids(self) -> list[int]:
        return sorted({getattr(self, f"{k}_id") for k in SPECIAL_TOKENS})

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Tokenizer":
        raise NotImplementedError

    def fingerprint(self) -> str:
        blob = json.dumps(self.state(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
