"""SentencePiece tokenizer (BPE or unigram), trained by `llmtrain.tokenizers.train`.

Every special token of base.py is a real piece: <pad>/<unk>/<s>/</s> are sentencepiece's own
pad/unk/bos/eos (ids 0-3) and [CLS]/[SEP]/[MASK] are user-defined symbols (ids 4-6).
`state()` carries the serialized model itself, so a checkpoint rebuilds the tokenizer without
the original .model file.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any, Optional

import sentencepiece as spm

from llmtrain.errors import UserError
from llmtrain.registry import register
from llmtrain.tokenizers.base import SPECIAL_TOKENS, Tokenizer


@register("tokenizer", "sentencepiece")
class SentencePieceTokenizer(Tokenizer):
    name = "sentencepiece"

    def __init__(self, model_proto: bytes, path: Optional[str] = None):
        where = path or "<serialized sentencepiece model>"
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise UserError(f"{where}: not a valid sentencepiece model ({_short(e)})") from None
        self.sp = sp
        self.model_proto = bytes(model_proto)
        self.path = str(path) if path is not None else None
        self.vocab_size = sp.get_piece_size()
        self._set_special_ids(where)
        self._special = frozenset(self.special_ids)

    def _set_special_ids(self, where: str) -> None:
        sp = self.sp
        missing = []
        for key, piece in SPECIAL_TOKENS.items():
            i = sp.piece_to_id(piece)
            if not (0 <= i < self.vocab_size) or sp.id_to_piece(i) != piece:
                missing.append(piece)
                continue
            setattr(self, f"{key}_id", i)
        if missing:
            raise UserError(
                f"{where}: sentencepiece model lacks the special pieces {', '.join(missing)}; "
                "train one with llmtrain (tokenizer.name=sentencepiece with tokenizer.path "
                "pointing to a file that does not exist yet)"
            )

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "SentencePieceTokenizer":
        p = Path(path)
        try:
            blob = p.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{p}: sentencepiece model file not found (tokenizer.path)") from None
        except OSError as e:
            raise UserError(f"{p}: cannot read sentencepiece model ({e.strerror or e})") from None
        if not blob:
            raise UserError(f"{p}: not a valid sentencepiece model (empty file)")
        return cls(blob, path=str(p))

    # -- encoding ----------------------------------------------------------------------------

    encode_threads: int | None = None  # None: sentencepiece's default, one per core

    def encode(self, text: str) -> list[int]:
        # No bos/eos: the data pipeline adds end-of-document tokens itself.
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # One C++ call for the whole list; sentencepiece spreads it over its own threads (all cores
        # unless `encode_threads` says how many: prepare's worker processes share the cores).
        return self.sp.encode(list(texts), out_type=int, num_threads=self.encode_threads)

    def decode(self, ids: list[int]) -> str:
        # Like CharTokenizer: special tokens are dropped (unk shows as U+FFFD), and ids outside
        # the vocabulary (a model's vocab is padded up to a multiple) are ignored.
        n, special, unk = self.vocab_size, self._special, self.unk_id
        keep = [i for i in map(int, ids) if 0 <= i < n and (i not in special or i == unk)]
        return self.sp.decode(keep)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    # -- serialisation -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_proto": base64.b64encode(self.model_proto).decode("ascii"),
            "path": self.path,  # for information only; from_state uses the proto
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "SentencePieceTokenizer":
        try:
            blob = base64.b64decode(state["model_proto"], validate=True)
        except (KeyError, ValueError, TypeError):
            raise UserError("tokenizer state: missing or corrupt sentencepiece model_proto") from None
        return cls(blob, path=state.get("path"))

    def fingerprint(self) -> str:
        # The model alone identifies the tokenizer; where it was loaded from does not matter.
        h = hashlib.sha256(self.name.encode() + b"\0" + self.model_proto)
        return h.hexdigest()[:16]

    # SentencePieceProcessor itself is not reliably picklable (DataLoader workers, DDP spawn).
    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self.model_proto, "path": self.path}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__init__(d["model_proto"], path=d["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def _short(e: BaseException) -> str:
    """sentencepiece's C++ errors carry a source location and a check expression; keep the gist."""
    msg = " ".join(str(e).split())
    if "ParseFromArray" in msg:
        return "cannot parse the model protobuf"
    msg = msg.removeprefix("INTERNAL: ")
    return msg[:200] or type(e).__name__
