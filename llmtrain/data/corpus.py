"""Documents -> token arrays split into train / validation.

The split is decided on the text, before tokenizing, so a tokenizer can be trained on the
training part alone (`split_documents`): the last val_fraction of the corpus (counted in
characters, each document's end counting as one) validates. The cut moves to the nearest
document boundary when one lies within SNAP of the requested size, so no document straddles it;
otherwise (one document, or a few large ones) it falls inside a document at that character.
With `data.val_path` the validation part is that source, whole. Each document ends with the eos
token (a document cut in two: its validation part).

Documents are encoded line by line (all lines of a batch in one `encode_batch` call) when the
tokenizer makes "\n" a token of its own, as ours all do: sentencepiece is much faster on many
short inputs than on one long one and spreads them over its threads. For BPE, char and byte
the ids are those of encoding the whole text; a unigram model may break exact score ties
differently, so every stage encodes the same way (this module and prepare.py).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Callable

import numpy as np

from llmtrain.errors import UserError
from llmtrain.tokenizers import Tokenizer


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    n_docs: int
    val_bytes: int  # UTF-8 bytes of the validation text, for bits per byte
    by: str = "document"  # how the split was made (DocSplit.by)
    unk: int = 0  # tokens that are <unk> (characters the tokenizer lacks), both splits

    def describe(self) -> str:
        """The split as the start-up lines show it."""
        if not hasattr(self.train, "__len__"):  # data.streaming: a stream, never counted
            return f"streamed train tokens / {len(self.val):,} val tokens"
        n = len(self.train) + len(self.val)
        frac = len(self.val) / n if n else 0.0
        return f"{len(self.train):,} train / {len(self.val):,} val tokens (val {100 * frac:.1f}%, split {self.by})"


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 2**16 else np.uint32


def newline_is_atomic(tok: Tokenizer) -> bool:
    """True when "\n" always encodes to a token of its own, so a text may be encoded line by line
    (our sentencepiece models make "\n" a user-defined symbol)."""
    if tok.name in ("char", "byte"):
        return True
    try:
        nl = tok.encode("\n")
        return (
            len(nl) == 1
            and nl[0] != tok.unk_id
            and tok.encode("a\n\n b\n") == (tok.encode("a") + nl + nl + tok.encode(" b") + nl)
        )
    except Exception:  # noqa: BLE001 - a tokenizer we know nothing about: encode texts whole
        return False


def _bpe_splits_at_spaces(tok: Tokenizer) -> bool:
    """True for a sentencepiece BPE model that never merges across a space that follows a
    non-space (split_by_whitespace, whitespace as prefix) and does not rewrite the text (identity
    normalization): then a text encodes to the concatenation of its space-led words' encodings."""
    proto = getattr(tok, "model_proto", None)
    if tok.name != "sentencepiece" or proto is None:
        return False
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString(proto)
    except Exception:  # noqa: BLE001 - protobuf missing or an unexpected model: no shortcut
        return False
    t, n = m.trainer_spec, m.normalizer_spec
    return (
        t.model_type == pb.TrainerSpec.BPE
        and t.split_by_whitespace
        and not t.treat_whitespace_as_suffix
        and not getattr(t, "pretokenization_delimiter", "")
        and n.name == "identity"
        and not n.add_dummy_prefix
        and not n.remove_extra_whitespaces
        and not n.normalization_rule_tsv
        and not any(" " in p.piece for p in m.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED)
    )


def encode_mode(tok: Tokenizer) -> str:
    """How texts may be cut before encoding without changing the ids: "words" (space-led words,
    encoded once per distinct word), "lines" (after each newline) or "whole"."""
    if not newline_is_atomic(tok):
        return "whole"
    return "words" if _bpe_splits_at_spaces(tok) else "lines"


def split_lines(text: str) -> list[str]:
    """The text cut after every "\n" (str.splitlines would also cut at \r, \x0c, ...)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


class _WordCache:
    """Distinct words -> their ids, for one tokenizer (fingerprint), bounded: most text reuses few
    words. Word k's ids are ids[starts[k] : starts[k] + lens[k]] in one flat array, so a task's
    words are looked up once each and their ids gathered with numpy (a Python list of ids per word
    cost more than the lookups: fromiter over them was a quarter of a task)."""

    MAX_WORDS = 2_000_000

    def __init__(self) -> None:
        self.reset("")

    def reset(self, owner: str) -> None:
        self.owner = owner
        self.index: dict[str, int] = {}
        self.ids, self.starts, self.lens = array("I"), array("q"), array("q")

    def add(self, words: list[str], seqs: list[list[int]]) -> None:
        for word, seq in zip(words, seqs):
            self.index[word] = len(self.starts)
            self.starts.append(len(self.ids))
            self.lens.append(len(seq))
            self.ids.extend(seq)


_word_cache = _WordCache()
# Each byte's class (0 other, 1 space, 2 newline), and whether a byte of class c after one of
# class p starts a word (index 3 * c + p): a newline, the byte after one, a space after a non-space.
_BYTE_CLASS = np.zeros(256, dtype=np.uint8)
_BYTE_CLASS[ord(" ")], _BYTE_CLASS[ord("\n")] = 1, 2
_STARTS_WORD = np.array([3 * c + p in (2, 3, 5, 6, 7, 8) for c in range(3) for p in range(3)])


def _encode_words(tok: Tokenizer, texts: list[str], dtype) -> list[np.ndarray]:
    """Encode each distinct word once and gather the ids of every occurrence with numpy.

    Words are sentencepiece's: a newline, or a run of spaces with the non-space characters after
    it (a trailing run of spaces alone). Their boundaries are found on the UTF-8 bytes with numpy
    (a space or newline byte is never inside a multi-byte character) and the words are grouped by
    Arrow's exact hash table over zero-copy views of those bytes: no Python object per word.
    Offsets and counts are int32 below 2**31 bytes and the byte classes come from two table
    lookups: a task's temporaries are about a third of what int64 arrays and boolean algebra took
    (less memory traffic, and less for glibc's heap to fragment over a long prepare).
    """
    import pyarrow as pa  # a dependency of `datasets`; imported here to keep start-up light
    import pyarrow.compute as pc

    cache = _word_cache
    if cache.owner != tok.fingerprint() or len(cache.index) > cache.MAX_WORDS:
        cache.reset(tok.fingerprint())
    encoded = [t.encode("utf-8") for t in texts]
    text_lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    text_starts = np.cumsum(text_lens) - text_lens
    data = encoded[0] if len(encoded) == 1 else b"".join(encoded)
    del encoded  # (each temporary is dropped once used: the task's peak is what is live at once)
    b = np.frombuffer(data, dtype=np.uint8)
    n = len(b)
    idx = np.int32 if n < 2**31 else np.int64  # every offset and token count below is at most n
    cls = _BYTE_CLASS.take(b)
    pair = np.empty(n, dtype=np.uint8)
    pair[:1] = 3 * cls[:1] + 2  # the first byte follows a newline
    np.multiply(cls[1:], 3, out=pair[1:])
    pair[1:] += cls[:-1]
    del cls
    is_start = _STARTS_WORD.take(pair)
    del pair
    is_start[text_starts[text_starts < n]] = True  # a word never spans two texts
    word_starts = np.flatnonzero(is_start)
    del is_start
    offsets = np.empty(len(word_starts) + 1, dtype=idx)
    offsets[:-1] = word_starts
    offsets[-1] = n
    string_array = pa.StringArray if idx is np.int32 else pa.LargeStringArray
    words = string_array.from_buffers(len(word_starts), pa.py_buffer(offsets), pa.py_buffer(data))
    # the system allocator, not pyarrow's mimalloc: its pages are glibc's, which prepare's heap
    # trimming hands back (mimalloc's kept a 1 GB prepare's peak RSS 60 MB higher than at 100 MB)
    grouped = pc.dictionary_encode(words, memory_pool=pa.system_memory_pool())
    del words, offsets
    ind = grouped.indices  # int32, no nulls; read in place: Array.to_numpy imports pandas (0.16 s)
    codes = np.frombuffer(ind.buffers()[1], dtype=np.int32, count=len(ind), offset=ind.offset * 4)
    uniques = grouped.dictionary.to_pylist()
    keys = np.fromiter(map(cache.index.get, uniques, repeat(-1)), dtype=np.int64, count=len(uniques))
    missing = np.flatnonzero(keys < 0)
    if len(missing):
        new_words = [uniques[i] for i in missing]
        keys[missing] = np.arange(len(cache.starts), len(cache.starts) + len(new_words))
        cache.add(new_words, tok.encode_batch(new_words))
    del uniques
    # views of the cache's arrays: none outlives this call (an array cannot grow while viewed)
    ids = np.frombuffer(cache.ids, dtype=np.uint32)
    lens = np.frombuffer(cache.lens, dtype=np.int64).take(keys).astype(idx)
    starts = np.frombuffer(cache.starts, dtype=np.int64).take(keys)
    n_occ = lens.take(codes)  # tokens of each word occurrence
    ends = np.cumsum(n_occ, dtype=idx)
    total = int(ends[-1]) if len(ends) else 0
    # token j of the output is ids[its word's start + j - its occurrence's start]
    src = starts.take(codes)
    src -= ends
    src += n_occ
    del codes, grouped, ind
    gather = np.repeat(src, n_occ)
    del src
    gather += np.arange(total, dtype=np.int64)
    out = ids.take(gather).astype(dtype, copy=False)
    del gather, ids
    first_word = np.searchsorted(word_starts, text_starts[1:])  # each later text's first word
    cuts = [int(ends[w - 1]) if w > 0 else 0 for w in first_word]
    return np.split(out, cuts)


def encode_texts(tok: Tokenizer, texts: list[str], mode: str, dtype=np.int64) -> list[np.ndarray]:
    """The ids of each text, cut as `mode` (from encode_mode) allows; the ids are the same."""
    if mode == "words":
        return _encode_words(tok, texts, dtype)
    if mode == "whole":
        return [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(texts)]
    lines: list[str] = []
    counts = []
    for t in texts:
        parts = split_lines(t)
        lines += parts
        counts.append(len(parts))
    flat = tok.encode_batch(lines)  # one call: sentencepiece spreads it over its threads
    out, i = [], 0
    for c in counts:
        seqs = flat[i : i + c]
        out.append(np.fromiter(chain.from_iterable(seqs), dtype=dtype, count=sum(map(len, seqs))))
        i += c
    return out


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    return [np.concatenate([x, eos]) for x in encode_texts(tokenizer, docs, encode_mode(tokenizer), dtype)]


# A document boundary within this fraction of the requested validation size takes the cut
# (documents stay whole); further away, the cut falls inside a document.
SNAP = 0.05


@dataclass
class DocSplit:
    """The documents of each side; `cut_inside` means the last training document continues as
    the first validation document (no eos between them)."""

    train: list[str]
    val: list[str]
    cut_inside: bool
    by: str  # "document" | "within a document" | "val_path" | "none"


def split_point(lengths: Any, val_fraction: float) -> tuple[int, int, str]:
    """Where split_documents cuts documents of these character lengths: (k, offset, by) — train is
    documents [0, k) plus the first `offset` characters of document k (offset > 0: the cut is
    inside it), validation the rest. Only lengths are needed, so a corpus can be split on a
    counting pass without holding its text."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if val_fraction == 0 or not len(lengths):
        return len(lengths), 0, "none"
    units = np.cumsum(lengths + 1)  # each document's end counts as one
    total = int(units[-1])
    cut = int(total * (1 - val_fraction))  # units before the cut train
    inner = units[:-1]  # boundaries strictly inside the corpus
    if len(inner):
        j = int(np.argmin(np.abs(inner - cut)))
        if abs(int(inner[j]) - cut) <= SNAP * (total - cut):
            return j + 1, 0, "document"
    k = int(np.searchsorted(units, cut, side="right"))  # the document holding unit `cut`
    start = int(units[k - 1]) if k else 0
    offset = cut - start
    n_k = int(lengths[k])
    if offset >= n_k:  # the cut is at document k's end
        if k + 1 < len(lengths):
            return k + 1, 0, "document"
        offset = max(n_k - 1, 0)  # keep at least the last character for validation
    if offset == 0:
        return k, 0, "document"
    return k, offset, "within a document"


def split_documents(docs: list[str], val_fraction: float, val_docs: list[str] | None = None) -> DocSplit:
    """Train / validation documents: `val_docs` (data.val_path) when given, else the last
    val_fraction of `docs` by characters (see the module docstring)."""
    if val_docs is not None:
        return DocSplit(list(docs), list(val_docs), False, "val_path")
    k, offset, by = split_point([len(d) for d in docs], val_fraction)
    if not offset:
        return DocSplit(list(docs[:k]), list(docs[k:]), False, by)
    head, tail = docs[k][:offset], docs[k][offset:]
    return DocSplit(list(docs[:k]) + [head], [tail] + list(docs[k + 1 :]), True, by)


def read_split(data: Any) -> DocSplit:
    """The train / validation documents of a DataConfig (data.path, data.val_path, val_fraction)."""
    from llmtrain.data.sources import read_documents

    docs = read_documents(data.path, data.text_field, data.encoding_errors, data.doc_pattern)
    val = None
    if getattr(data, "val_path", None):
        val = read_documents(data.val_path, data.text_field, data.encoding_errors, data.doc_pattern, "data.val_path")
    return split_documents(docs, data.val_fraction, val)


def split_reader(data: Any) -> Callable[[], DocSplit]:
    """A zero-argument function returning read_split(data), read on the first call only (so
    loading a cached tokenizer or prepared shards never reads the corpus)."""
    done: list[DocSplit] = []

    def read() -> DocSplit:
        if not done:
            done.append(read_split(data))
        return done[0]

    return read


def unk_count(tokens: np.ndarray, tokenizer: Tokenizer) -> int:
    """How many tokens are <unk>: 0 for tokenizers that never produce it (byte, byte-fallback BPE)."""
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None or len(tokens) == 0 or unk in (tokenizer.eos_id, tokenizer.pad_id):
        return 0  # an HF tokenizer whose unk borrows eos/pad: every eos would count
    return int(np.count_nonzero(np.asarray(tokens) == unk))


# Above this fraction of <unk> tokens a run warns: the model is trained or scored on placeholders.
UNK_WARN = 0.001


def unk_report(n_unk: int, n_tokens: int, what: str) -> str | None:
    """The line that reports <unk> tokens (a warning above UNK_WARN), or None when there are none."""
    if n_unk == 0 or n_tokens == 0:
        return None
    rate = n_unk / n_tokens
    head = "warning: " if rate > UNK_WARN else ""
    return (
        f"{head}{what}: {n_unk:,} of {n_tokens:,} tokens ({100 * rate:.2f}%) are <unk>: characters the "
        "tokenizer's vocabulary lacks"
    )


def unknown_characters(tokenizer: Tokenizer, text: str) -> list[str]:
    """The distinct characters of `text` that encode to <unk> (a char vocabulary lacks them)."""
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None or unk in (tokenizer.eos_id, tokenizer.pad_id):
        return []
    return [c for c in dict.fromkeys(text) if unk in tokenizer.encode(c)]


def split_tokens(
    docs: list[str], tokenizer: Tokenizer, val_fraction: float, val_docs: list[str] | None = None
) -> TokenSplits:
    """The token splits of `split_documents`, identical to what llmtrain.data.prepare writes."""
    return tokenize_split(split_documents(docs, val_fraction, val_docs), tokenizer)


def tokenize_split(ds: DocSplit, tokenizer: Tokenizer) -> TokenSplits:
    dtype = token_dtype(tokenizer.vocab_size)
    mode = encode_mode(tokenizer)
    eos = np.array([tokenizer.eos_id], dtype=dtype)

    def join(texts: list[str], open_end: bool) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=dtype)
        seqs = encode_texts(tokenizer, texts, mode, dtype)
        parts = [p for i, x in enumerate(seqs) for p in ((x,) if open_end and i == len(seqs) - 1 else (x, eos))]
        return np.concatenate(parts)

    train, val = join(ds.train, ds.cut_inside), join(ds.val, False)
    val_bytes = sum(len(d.encode("utf-8")) for d in ds.val)
    n_docs = len(ds.train) + len(ds.val) - int(ds.cut_inside)
    unk = unk_count(train, tokenizer) + unk_count(val, tokenizer)
    return TokenSplits(train=train, val=val, n_docs=n_docs, val_bytes=val_bytes, by=ds.by, unk=unk)
