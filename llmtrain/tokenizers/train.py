"""Training a SentencePiece tokenizer, and `build_tokenizer`: one place that turns a
TokenizerConfig into a ready tokenizer (loading a trained model, or training it first).

Settings chosen for LM pretraining, where decode(encode(text)) must give back the text:
- normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False:
  the text is not rewritten (nmt_nfkc would fold full-width forms and ligatures, collapse
  runs of spaces and change what the model sees and generates), so tokenization is lossless
  and documents can be concatenated id-wise without a spurious space between them.
- byte_fallback (default on): characters outside the vocabulary become <0xNN> byte pieces
  instead of <unk>, so nothing is lost either.
- "\\n" and "\\t" are user-defined symbols (after [CLS]/[SEP]/[MASK]): sentencepiece's trainer
  never learns control characters, so without this they would be <unk> (or byte pieces).
- split_digits, allow_whitespace_only_pieces: digits tokenized one by one (arithmetic
  generalises better), runs of spaces (indentation) may become single pieces.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import sentencepiece as spm

from llmtrain.errors import UserError
from llmtrain.files import atomic_write
from llmtrain.tokenizers.base import SPECIAL_TOKENS, Tokenizer
from llmtrain.tokenizers.sentencepiece import SentencePieceTokenizer

MODEL_TYPES = ("bpe", "unigram")
# sentencepiece skips training sentences longer than max_sentence_length bytes; documents are
# fed line by line and long lines are cut into chunks of at most _CHUNK_CHARS characters
# (<= 4 bytes each in UTF-8, so a chunk always fits).
_MAX_SENTENCE_BYTES = 16384
_CHUNK_CHARS = _MAX_SENTENCE_BYTES // 4
EXTRA_SYMBOLS = ["\n", "\t"]


class _Sentences:
    """Iterates training sentences from documents, counting what it saw; an exception raised
    while reading the corpus is kept so it can be re-raised as itself after sentencepiece
    (which wraps it in a RuntimeError) gives up."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.documents = 0
        self.sentences = 0
        self.chars = 0
        self.nonspace_chars = 0
        self.error: Optional[BaseException] = None

    def __iter__(self) -> Iterator[str]:
        try:
            for doc in self.texts:
                if not isinstance(doc, str):
                    raise UserError(f"tokenizer training data: expected text, got {type(doc).__name__}")
                self.documents += 1
                for line in doc.splitlines():
                    if not line or line.isspace():
                        continue
                    for i in range(0, len(line), _CHUNK_CHARS):
                        chunk = line[i : i + _CHUNK_CHARS]
                        self.sentences += 1
                        self.chars += len(chunk)
                        self.nonspace_chars += len(chunk) - sum(c.isspace() for c in chunk)
                        yield chunk
        except (Exception, KeyboardInterrupt) as e:  # re-raised by train_sentencepiece
            self.error = e
            raise


def _trainer_kwargs(cfg: Any) -> dict[str, Any]:
    model_type = str(cfg.model_type).lower()
    if model_type not in MODEL_TYPES:
        raise UserError(f"tokenizer.model_type must be one of {', '.join(MODEL_TYPES)}, got {cfg.model_type!r}")
    if not isinstance(cfg.vocab_size, int) or cfg.vocab_size <= 0:
        raise UserError(f"tokenizer.vocab_size must be a positive integer, got {cfg.vocab_size!r}")
    if not 0.0 < float(cfg.character_coverage) <= 1.0:
        raise UserError(f"tokenizer.character_coverage must be in (0, 1], got {cfg.character_coverage!r}")
    if int(cfg.input_sentence_size) < 0:
        raise UserError(f"tokenizer.input_sentence_size must be >= 0 (0 = all), got {cfg.input_sentence_size!r}")
    s = SPECIAL_TOKENS
    return dict(
        model_type=model_type,
        vocab_size=int(cfg.vocab_size),
        character_coverage=float(cfg.character_coverage),
        byte_fallback=bool(cfg.byte_fallback),
        input_sentence_size=int(cfg.input_sentence_size),
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=s["pad"],
        unk_piece=s["unk"],
        bos_piece=s["bos"],
        eos_piece=s["eos"],
        user_defined_symbols=[s["cls"], s["sep"], s["mask"], *EXTRA_SYMBOLS],
        unk_surface="\ufffd",
        hard_vocab_limit=True,
        num_threads=max(1, min(16, os.cpu_count() or 1)),
        minloglevel=2,  # errors only; sentencepiece is very chatty on stderr otherwise
    )


def recorded_settings(cfg: Any) -> dict[str, Any]:
    """The trainer settings that decide the model (as its JSON sidecar records them), without
    those that only decide how it is trained (threads, log level): the tokenizer cache key."""
    kwargs = _trainer_kwargs(cfg)
    return json.loads(json.dumps({k: v for k, v in kwargs.items() if k not in ("num_threads", "minloglevel")}))


def _vocab_error(msg: str, vocab_size: int, stats: _Sentences) -> Optional[UserError]:
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return UserError(
            f"tokenizer.vocab_size={vocab_size} is too large for this corpus "
            f"({stats.chars} training characters support at most {m.group(2)}); lower tokenizer.vocab_size"
        )
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return UserError(
            f"tokenizer.vocab_size={vocab_size} is too small: the special pieces, byte pieces and "
            f"required characters alone need {m.group(2)}; raise tokenizer.vocab_size "
            "(or lower tokenizer.character_coverage)"
        )
    return None


def train_sentencepiece(texts: Iterable[str], cfg: Any, out_path: str | Path) -> SentencePieceTokenizer:
    """Train a SentencePiece model on `texts` (document strings) with the settings of `cfg`
    (a TokenizerConfig), write it atomically to `out_path` plus a `.json` sidecar with the
    settings and stats, and return the loaded tokenizer."""
    out_path = Path(out_path)
    kwargs = _trainer_kwargs(cfg)
    sentences = _Sentences(texts)
    buf = io.BytesIO()
    t0 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, **kwargs)
    except RuntimeError as e:
        if sentences.error is not None:
            raise sentences.error from None
        if sentences.nonspace_chars == 0:
            raise UserError("tokenizer training data is empty (no non-whitespace text)") from None
        err = _vocab_error(str(e), kwargs["vocab_size"], sentences)
        if err is not None:
            raise err from None
        msg = " ".join(str(e).split()).removeprefix("INTERNAL: ")
        raise UserError(f"sentencepiece training failed for {out_path}: {msg[:300]}") from None
    if sentences.error is not None:
        raise sentences.error
    if sentences.nonspace_chars == 0:
        raise UserError("tokenizer training data is empty (no non-whitespace text)")
    seconds = time.perf_counter() - t0
    proto = buf.getvalue()
    tok = SentencePieceTokenizer(proto, path=str(out_path))  # validates before anything is written

    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, proto)
    settings = recorded_settings(cfg)
    meta = {
        "model_file": out_path.name,
        "settings": settings,
        "stats": {
            "vocab_size": tok.vocab_size,
            "documents": sentences.documents,
            "training_sentences": sentences.sentences,
            "training_chars": sentences.chars,  # fed to the trainer, before sampling
            "sentences_sampled": min(sentences.sentences, kwargs["input_sentence_size"] or sentences.sentences),
            "train_seconds": round(seconds, 3),
            "sentencepiece_version": getattr(spm, "__version__", "unknown"),
        },
        "fingerprint": tok.fingerprint(),
    }
    atomic_write(out_path.with_suffix(".json"), (json.dumps(meta, indent=2, ensure_ascii=True) + "\n").encode())
    return tok


def build_tokenizer(
    cfg: Any,
    texts_fn: Callable[[], Iterable[str]],
    *,
    default_path: str | Path | None = None,
) -> Tokenizer:
    """The tokenizer `cfg` (a TokenizerConfig) asks for. `texts_fn()` returns the training
    documents; it is only called when a tokenizer has to be trained (char, or a sentencepiece,
    wordpiece or bpe model whose file does not exist yet), so loading one never reads the corpus."""
    name = cfg.name
    if name == "char":
        from llmtrain.tokenizers.char import CharTokenizer

        return CharTokenizer.train(texts_fn(), cfg)
    if name == "byte":
        from llmtrain.tokenizers.byte import ByteTokenizer

        return ByteTokenizer()
    if name == "sentencepiece":
        if cfg.path:
            path = Path(cfg.path)
            if path.exists():
                return SentencePieceTokenizer.load(path)
        elif default_path is not None:
            path = Path(default_path)
        else:
            raise UserError("tokenizer.path must be set for tokenizer.name=sentencepiece")
        print(f"training sentencepiece tokenizer (vocab {cfg.vocab_size}) -> {path}", file=sys.stderr, flush=True)
        return train_sentencepiece(texts_fn(), cfg, path)
    if name == "hf":
        from llmtrain.tokenizers.hf import HFTokenizer

        return HFTokenizer.from_dir(cfg.path)
    if name in ("wordpiece", "bpe"):
        from llmtrain.tokenizers.hf_train import TRAINED, train_hf

        if cfg.path and Path(cfg.path).exists():
            return TRAINED[name].load(cfg.path)
        path = cfg.path or default_path
        where = f" -> {path}" if path else ""
        print(f"training {name} tokenizer (vocab {cfg.vocab_size}){where}", file=sys.stderr, flush=True)
        return train_hf(texts_fn(), cfg, path)
    # Tokenizers registered elsewhere: train() if they have it.
    from llmtrain.tokenizers import tokenizer_class

    cls = tokenizer_class(name)
    if hasattr(cls, "train"):
        return cls.train(texts_fn(), cfg)
    return cls()
