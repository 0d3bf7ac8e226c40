"""WordPiece (BERT-style) and byte-level BPE (GPT-2-style) tokenizers, trained with the Hugging
Face `tokenizers` library (Rust) and used through HFTokenizer, so encoding, state, pickling and
export are the ones of an imported HF tokenizer.

- wordpiece: BertNormalizer (tokenizer.lowercase; accents are stripped when lowercasing, as
  bert-base-uncased), BertPreTokenizer (splits on whitespace and punctuation), "##" continuation
  pieces, specials [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0-4 ([CLS]/[SEP] also serve as bos/eos).
  Lossy like BERT's: whitespace is not kept, decode joins words with single spaces.
- bpe: GPT-2's byte-level pre-tokenizer (its regex split, bytes mapped to printable symbols),
  all 256 bytes in the initial alphabet (nothing is ever unknown), merges learned up to
  tokenizer.vocab_size; the specials are llmtrain's own (<pad> <unk> <s> </s> [CLS] [SEP]
  [MASK], ids 0-6), so every objective finds its tokens. Lossless: decode(encode(t)) == t.

tokenizer.special_tokens adds more (e.g. "<|im_start|>") right after the built-in ones. As in
llmtrain's other tokenizers, a special token typed in text is ordinary text (split_special_tokens).
A trained tokenizer is one tokenizer.json file (the library's own format, tokenizer.path) with a
<stem>.meta.json sidecar recording the settings and training stats.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from llmtrain.errors import UserError
from llmtrain.files import atomic_write
from llmtrain.registry import register
from llmtrain.tokenizers.base import SPECIAL_TOKENS
from llmtrain.tokenizers.hf import HFTokenizer

BERT_SPECIALS = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "bos": "[CLS]",
    "eos": "[SEP]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
}


class TrainedHFTokenizer(HFTokenizer):
    """An HFTokenizer whose pipeline llmtrain trains; subclasses give the model and its specials."""

    specials: dict[str, str] = {}
    model_type = ""  # the "model.type" of its tokenizer.json

    def __init__(self, tokenizer_json: str, special_tokens=None, split_special_tokens: bool = True):
        super().__init__(tokenizer_json, special_tokens or self.specials, split_special_tokens)
        missing = [t for t in self.special_tokens.values() if t is not None and self.tk.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer {self.name}: its vocabulary lacks the special tokens {', '.join(missing)}")

    @classmethod
    def pipeline(cls, cfg: Any):
        raise NotImplementedError

    @classmethod
    def trainer(cls, cfg: Any, special_tokens: list[str]):
        raise NotImplementedError

    @classmethod
    def min_vocab(cls, n_special: int) -> int:
        return n_special + 1

    @classmethod
    def load(cls, path: str | Path) -> "TrainedHFTokenizer":
        """A tokenizer.json this class trained (tokenizer.path)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{p}: tokenizer file not found (tokenizer.path)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: cannot read the tokenizer file ({getattr(e, 'strerror', None) or e})") from None
        try:
            kind = json.loads(text)["model"]["type"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{p}: not a Hugging Face tokenizer.json (tokenizer.path)") from None
        if kind != cls.model_type:
            raise UserError(
                f"{p}: a {kind} tokenizer, not {cls.model_type} (tokenizer={cls.name}); "
                "use tokenizer=hf tokenizer.path=DIR for other Hugging Face tokenizers"
            )
        return cls(text)


@register("tokenizer", "wordpiece")
class WordPieceTokenizer(TrainedHFTokenizer):
    name = "wordpiece"
    specials = BERT_SPECIALS
    model_type = "WordPiece"

    @classmethod
    def pipeline(cls, cfg: Any):
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        tk = Tokenizer(models.WordPiece(unk_token=cls.specials["unk"], continuing_subword_prefix="##"))
        tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=cfg.lowercase)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece(prefix="##")
        return tk

    @classmethod
    def trainer(cls, cfg: Any, special_tokens: list[str]):
        from tokenizers import trainers

        return trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, special_tokens=special_tokens, continuing_subword_prefix="##", show_progress=False
        )


@register("tokenizer", "bpe")
class ByteLevelBPETokenizer(TrainedHFTokenizer):
    name = "bpe"
    specials = dict(SPECIAL_TOKENS)
    model_type = "BPE"

    @classmethod
    def pipeline(cls, cfg: Any):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tk = Tokenizer(models.BPE())  # no unk: every byte is in the vocabulary
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        return tk

    @classmethod
    def trainer(cls, cfg: Any, special_tokens: list[str]):
        from tokenizers import pre_tokenizers, trainers

        return trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )

    @classmethod
    def min_vocab(cls, n_special: int) -> int:
        return n_special + 256


TRAINED: dict[str, type[TrainedHFTokenizer]] = {"wordpiece": WordPieceTokenizer, "bpe": ByteLevelBPETokenizer}


def special_tokens(cfg: Any) -> list[str]:
    """The built-in specials of tokenizer `cfg.name` in id order, then tokenizer.special_tokens."""
    builtin = list(dict.fromkeys(TRAINED[cfg.name].specials.values()))
    extra = [str(t) for t in cfg.special_tokens]
    if any(not t for t in extra):
        raise UserError("tokenizer.special_tokens: a special token cannot be empty")
    return list(dict.fromkeys(builtin + extra))


def hf_settings(cfg: Any) -> dict[str, Any]:
    """What decides the trained tokenizer (its cache key and sidecar record)."""
    cls = TRAINED[cfg.name]
    specials = special_tokens(cfg)
    if not isinstance(cfg.vocab_size, int) or cfg.vocab_size < cls.min_vocab(len(specials)):
        raise UserError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for tokenizer={cfg.name}: its "
            f"{len(specials)} special tokens{' and 256 byte symbols' if cfg.name == 'bpe' else ''} alone need "
            f"{cls.min_vocab(len(specials)) - 1}; raise tokenizer.vocab_size"
        )
    settings: dict[str, Any] = {"name": cfg.name, "vocab_size": int(cfg.vocab_size), "special_tokens": specials}
    if cfg.name == "wordpiece":
        settings["lowercase"] = bool(cfg.lowercase)
    return settings


def meta_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".meta.json")


class _Docs:
    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.documents = 0
        self.chars = 0
        self.nonspace = False

    def __iter__(self) -> Iterator[str]:
        for doc in self.texts:
            if not isinstance(doc, str):
                raise UserError(f"tokenizer training data: expected text, got {type(doc).__name__}")
            self.documents += 1
            self.chars += len(doc)
            self.nonspace = self.nonspace or not doc.isspace() and bool(doc)
            yield doc


def train_hf(texts: Iterable[str], cfg: Any, out_path: Optional[str | Path] = None) -> TrainedHFTokenizer:
    """Train tokenizer `cfg.name` (wordpiece or bpe) on `texts` (documents); when `out_path` is
    given, write its tokenizer.json there atomically with a .meta.json sidecar."""
    cls = TRAINED[cfg.name]
    settings = hf_settings(cfg)
    tk = cls.pipeline(cfg)
    docs = _Docs(texts)
    t0 = time.perf_counter()
    tk.train_from_iterator(iter(docs), cls.trainer(cfg, settings["special_tokens"]))
    seconds = time.perf_counter() - t0
    if not docs.nonspace:
        raise UserError("tokenizer training data is empty (no non-whitespace text)")
    tok = cls(tk.to_str())
    if out_path is not None:
        import tokenizers

        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, tok.tokenizer_json.encode())
        meta = {
            "tokenizer_file": out.name,
            "settings": settings,
            "stats": {
                "vocab_size": tok.vocab_size,
                "documents": docs.documents,
                "training_chars": docs.chars,
                "train_seconds": round(seconds, 3),
                "tokenizers_version": tokenizers.__version__,
            },
            "fingerprint": tok.fingerprint(),
        }
        atomic_write(meta_path(out), (json.dumps(meta, indent=2, ensure_ascii=True) + "\n").encode())
    return tok
