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

_WORD_START = "\ue000"  # marks word starts while training WordPiece (see WordPieceTokenizer.fit)
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
    def fit(cls, cfg: Any, docs: Iterable[str], special_tokens: list[str]) -> str:
        """The trained tokenizer.json for `docs`."""
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
    def fit(cls, cfg: Any, docs: Iterable[str], special_tokens: list[str]) -> str:
        # Not trainers.WordPieceTrainer: it numbers the "##" pieces in hash-map order and breaks
        # ties between equally frequent merges by those numbers, so the same corpus gives another
        # vocabulary from run to run. It is BPE with "##" continuation pieces, converted; this is
        # the same from `tokenizers`' BPE trainer (deterministic: its alphabet is sorted) over
        # words marked at their start with a private-use character (BertNormalizer removes those
        # from text): "<mark>the" -> piece "the", "ing" -> "##ing".
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=cfg.lowercase)
        words = pre_tokenizers.BertPreTokenizer()  # whitespace and punctuation
        bpe = Tokenizer(models.BPE())
        bpe.normalizer = normalizer
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [words, pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="always", split=False)]
        )
        bpe.train_from_iterator(
            docs, trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=special_tokens, show_progress=False)
        )
        learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])[len(special_tokens) :]
        chars = sorted(t for t, _ in learned if len(t) == 1 and t != _WORD_START)
        vocab = list(special_tokens) + chars + ["##" + c for c in chars]  # every character both ways
        known = set(vocab)
        for t, _ in learned:  # merges in the order they were learned, while they fit
            piece = t[1:] if t.startswith(_WORD_START) else "##" + t
            if len(vocab) >= cfg.vocab_size:
                break
            if piece and piece != "##" and piece not in known:
                vocab.append(piece)
                known.add(piece)
        tk = Tokenizer(
            models.WordPiece(
                {t: i for i, t in enumerate(vocab)}, unk_token=cls.specials["unk"], continuing_subword_prefix="##"
            )
        )
        tk.add_special_tokens(list(special_tokens))
        tk.normalizer = normalizer
        tk.pre_tokenizer = words
        tk.decoder = decoders.WordPiece(prefix="##")
        return tk.to_str()


@register("tokenizer", "bpe")
class ByteLevelBPETokenizer(TrainedHFTokenizer):
    name = "bpe"
    specials = dict(SPECIAL_TOKENS)
    model_type = "BPE"

    @classmethod
    def fit(cls, cfg: Any, docs: Iterable[str], special_tokens: list[str]) -> str:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tk = Tokenizer(models.BPE())  # no unk: every byte is in the vocabulary
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(docs, trainer)
        return tk.to_str()

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
    docs = _Docs(texts)
    t0 = time.perf_counter()
    tokenizer_json = cls.fit(cfg, iter(docs), settings["special_tokens"])
    seconds = time.perf_counter() - t0
    if not docs.nonspace:
        raise UserError("tokenizer training data is empty (no non-whitespace text)")
    tok = cls(tokenizer_json)
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
