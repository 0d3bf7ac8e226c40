"""A Hugging Face `tokenizers` pipeline (e.g. GPT-2's byte-level BPE, BERT's WordPiece) used as
one of ours, for models imported with init_from=hf:DIR / checkpoint=hf:DIR.

Ids are the HF tokenizer's, without its post-processor (no [CLS]/[SEP] or bos added: our data
pipeline adds document boundaries itself). Our special-token ids map to the HF tokenizer's own
special tokens; one it lacks borrows a related one (GPT-2 has only <|endoftext|>, which then
serves as bos, eos, pad and unk alike) - see FALLBACKS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtrain.errors import UserError
from llmtrain.registry import register
from llmtrain.tokenizers.base import SPECIAL_TOKENS, Tokenizer

# our special key -> keys to borrow from, in order, when the HF tokenizer has no such token
FALLBACKS = {
    "eos": ("sep", "bos", "pad", "unk"),
    "bos": ("cls", "eos", "pad", "unk"),
    "pad": ("eos", "unk", "bos"),
    "unk": ("pad", "eos", "bos"),
    "cls": ("bos", "eos", "unk"),
    "sep": ("eos", "bos", "unk"),
    "mask": ("unk", "pad", "eos"),
}


@register("tokenizer", "hf")
class HFTokenizer(Tokenizer):
    name = "hf"

    def __init__(self, tokenizer_json: str, special_tokens: dict[str, str | None], split_special_tokens: bool = False):
        from tokenizers import Tokenizer as TkTokenizer

        try:
            self.tk = TkTokenizer.from_str(tokenizer_json)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions on bad JSON
            raise UserError(f"tokenizer state: not a valid Hugging Face tokenizer.json ({str(e)[:200]})") from None
        # True: special tokens typed in text are ordinary text, as transformers' split_special_tokens
        # (not part of tokenizer.json, so kept here)
        self.split_special_tokens = bool(split_special_tokens)
        self.tk.encode_special_tokens = self.split_special_tokens
        self.tokenizer_json = tokenizer_json
        self.special_tokens = {k: special_tokens.get(k) for k in SPECIAL_TOKENS}
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        ids = {k: (self.tk.token_to_id(t) if t is not None else None) for k, t in self.special_tokens.items()}
        for key in SPECIAL_TOKENS:
            i = ids[key]
            for other in FALLBACKS[key]:
                if i is None:
                    i = ids[other]
            if i is None:
                raise UserError(
                    "Hugging Face tokenizer has none of eos/bos/pad/unk special tokens; "
                    "llmtrain needs at least one (to mark document ends)"
                )
            setattr(self, f"{key}_id", i)
        self._special = frozenset(self.special_ids)

    @classmethod
    def from_dir(cls, path: str | None) -> "HFTokenizer":
        """tokenizer=hf tokenizer.path=DIR: a local Hugging Face tokenizer directory (with a
        tokenizer.json, e.g. one `llmtrain export` wrote) as the run's tokenizer."""
        return cls.from_pretrained(str(check_dir(path)))

    @classmethod
    def from_pretrained(cls, path: str) -> "HFTokenizer":
        """Any tokenizer transformers.AutoTokenizer loads as a fast (tokenizers-backed) one."""
        from transformers import AutoTokenizer

        try:
            # a local directory only; its code never runs (no trust_remote_code)
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - missing / corrupt files surface as many exception types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{path}: cannot load the Hugging Face tokenizer ({first})") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise UserError(
                f"{path}: the Hugging Face tokenizer is not a fast (tokenizers) one; save it with a tokenizer.json"
            )
        special = {k: _token_str(getattr(hf, f"{k}_token", None)) for k in SPECIAL_TOKENS}
        return cls(backend.to_str(), special, split_special_tokens=bool(getattr(hf, "split_special_tokens", False)))

    # -- encoding --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def piece_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def decode(self, ids: list[int]) -> str:
        # as our other tokenizers: special tokens and ids past the vocabulary are dropped
        keep = [i for i in map(int, ids) if 0 <= i < self.vocab_size and i not in self._special]
        return self.tk.decode(keep, skip_special_tokens=True)

    # -- serialisation ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        state = {"name": self.name, "tokenizer_json": self.tokenizer_json, "special_tokens": self.special_tokens}
        if self.split_special_tokens:  # only when set: states saved before the flag keep their fingerprint
            state["split_special_tokens"] = True
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "HFTokenizer":
        try:
            json_str = state["tokenizer_json"]
        except KeyError:
            raise UserError(f"tokenizer state: missing tokenizer_json for tokenizer {cls.name!r}") from None
        return cls(json_str, state.get("special_tokens") or {}, bool(state.get("split_special_tokens", False)))

    # for export back to HF format (llmtrain.hf.tokenizer)
    def hf_pipeline(self):
        from tokenizers import Tokenizer as TkTokenizer

        return TkTokenizer.from_str(self.tokenizer_json)

    def hf_special_kwargs(self) -> dict[str, str]:
        return {f"{k}_token": t for k, t in self.special_tokens.items() if t is not None}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers / spawn
        return self.state()

    def __setstate__(self, d: dict[str, Any]) -> None:
        HFTokenizer.__init__(self, d["tokenizer_json"], d["special_tokens"], d.get("split_special_tokens", False))


def check_dir(path: str | None) -> Path:
    """tokenizer.path for tokenizer=hf, checked before any work (UserError naming it)."""
    if not path:
        raise UserError("tokenizer=hf needs tokenizer.path=DIR (a Hugging Face tokenizer directory)")
    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a directory" if p.exists() else "does not exist"
        raise UserError(f"tokenizer.path={path}: {what} (tokenizer=hf wants a Hugging Face tokenizer directory)")
    if not (p / "tokenizer.json").is_file():
        raise UserError(f"tokenizer.path={path}: no tokenizer.json in it (save one with save_pretrained)")
    return p


def _token_str(t: Any) -> str | None:
    return None if t is None else str(t)
