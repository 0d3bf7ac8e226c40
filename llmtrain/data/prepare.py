"""Prepared data: a corpus tokenized once into memory-mappable token files, reused across runs.

    <cache root>/prepared/<key>/train.bin, val.bin   raw uint16 (vocab < 65,536) or uint32 tokens
    <cache root>/prepared/<key>/meta.json            written last: its presence means "complete"

The key hashes the source (file paths, sizes, mtimes, and the content of small files), the
settings that change the documents or the split, and the tokenizer's fingerprint, so a changed
source or another tokenizer lands in another directory and is never mixed with old shards; the
metadata is checked again on load. An entry is built in a temporary directory that is renamed
into place when complete, so an interrupted prepare is never mistaken for a finished one.

The cache root is `data.cache_dir`, else $LLMTRAIN_CACHE_DIR, else ~/.cache/llmtrain. The split
is that of `corpus.split_tokens` (one document: by position; several: by document), and the
tokens are identical to it: documents are only cut at newlines, and encoded the same way
(`corpus.encode_texts`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from llmtrain.data.corpus import TokenSplits, encode_mode, encode_texts, token_dtype
from llmtrain.data.sources import HF_PREFIX, parse_hf_spec, read_documents, resolve_files
from llmtrain.errors import UserError
from llmtrain.files import fsync_dir, fsync_tree
from llmtrain.tokenizers import Tokenizer, tokenizer_from_state

FORMAT = 1
META = "meta.json"
# Files up to this size are hashed by content too (a same-size, same-mtime edit is still seen).
SMALL_FILE_BYTES = 8 << 20
# Work items of about this many characters: big enough to amortise process hand-offs, small
# enough to keep every worker busy and the progress bar moving.
CHUNK_CHARS = 1 << 20


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("LLMTRAIN_CACHE_DIR") or "~/.cache/llmtrain"
    return Path(root).expanduser()


def sha_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def source_fingerprint(data: Any) -> str:
    """Identifies the documents `data` (a DataConfig) reads, without reading big files."""
    path = data.path
    if not path:
        raise UserError("data.path is not set (e.g. data=text data.path=FILE)")
    if path.startswith(HF_PREFIX):
        name, _, _ = parse_hf_spec(path)
        local = Path(name).expanduser()
        files = resolve_files(str(local)) if local.is_dir() else []  # hub datasets: by name only
    else:
        files = resolve_files(path)
    entries = []
    for f in files:
        st = f.stat()
        entry = [str(f.resolve()), st.st_size, st.st_mtime_ns]
        if st.st_size <= SMALL_FILE_BYTES:
            entry.append(hashlib.sha256(f.read_bytes()).hexdigest())
        entries.append(entry)
    # Settings that change which documents are read (files are named by their resolved paths
    # above, so "data/x.txt" and "./data/x.txt" share an entry).
    settings = [path if path.startswith(HF_PREFIX) else None, data.text_field, data.doc_pattern, data.encoding_errors]
    return sha_of([settings, entries])[:16]


def entry_key(data: Any, tokenizer: Tokenizer) -> str:
    split = [FORMAT, float(data.val_fraction)]
    return f"{sha_of([source_fingerprint(data), split])[:16]}-{tokenizer.fingerprint()}"


# ------------------------------------------------------------------------- tokenizing
def _pieces(doc: str, cut: bool) -> Iterator[str]:
    """A document in pieces of about CHUNK_CHARS characters, each ending after a newline."""
    if not cut or len(doc) <= CHUNK_CHARS:
        yield doc
        return
    start = 0
    while start < len(doc):
        end = doc.find("\n", start + CHUNK_CHARS)
        end = len(doc) if end < 0 else end + 1
        yield doc[start:end]
        start = end


def _tasks(docs: list[str], mode: str) -> Iterator[tuple[str, list[tuple[str, bool]]]]:
    """(mode, groups of (piece, ends_document)) of about CHUNK_CHARS characters, in corpus order."""
    cut = mode != "whole"
    group: list[tuple[str, bool]] = []
    size = 0
    for doc in docs:
        pieces = list(_pieces(doc, cut))
        for i, piece in enumerate(pieces):
            group.append((piece, i == len(pieces) - 1))
            size += len(piece)
            if size >= CHUNK_CHARS:
                yield mode, group
                group, size = [], 0
    if group:
        yield mode, group


_worker_tok: Tokenizer | None = None


def _init_worker(state: dict[str, Any]) -> None:
    global _worker_tok
    _worker_tok = tokenizer_from_state(state)


def _encode_task(task: tuple[str, list[tuple[str, bool]]], tok: Tokenizer | None = None) -> tuple[np.ndarray, int, int]:
    """-> (token ids with eos after each finished document, documents finished, characters)."""
    tok = tok or _worker_tok
    assert tok is not None
    mode, pieces = task
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    seqs = encode_texts(tok, [piece for piece, _ in pieces], mode, dtype)
    parts = chain.from_iterable((ids, eos) if ends else (ids,) for ids, (_, ends) in zip(seqs, pieces))
    arr = np.concatenate(list(parts)) if pieces else np.zeros(0, dtype=dtype)
    return arr, sum(e for _, e in pieces), sum(len(p) for p, _ in pieces)


def _progress(total_chars: int, what: str):
    from tqdm import tqdm

    # disable=None: only on a terminal, so logs and captured output stay clean.
    return tqdm(
        total=total_chars, unit="char", unit_scale=True, desc=what, disable=None, file=sys.stderr, dynamic_ncols=True
    )


def _write_tokens(docs: list[str], tok: Tokenizer, out, num_proc: int, bar) -> tuple[int, int]:
    """Tokenize `docs` into the open binary file `out`; -> (tokens, documents)."""
    mode = encode_mode(tok)
    n_tok = n_docs = 0
    t0 = time.perf_counter()

    def consume(results):
        nonlocal n_tok, n_docs
        for arr, done, chars in results:
            out.write(arr.tobytes())
            n_tok += len(arr)
            n_docs += done
            bar.update(chars)
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{n_docs / dt:,.0f} docs/s, {n_tok / dt:,.0f} tokens/s", refresh=False)

    # Worker processes cost a start-up and a word cache each: only worth it for larger corpora.
    if num_proc <= 1 or sum(map(len, docs)) < 4 * CHUNK_CHARS:
        consume(_encode_task(t, tok) for t in _tasks(docs, mode))
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(num_proc, _init_worker, (tok.state(),)) as pool:
            consume(pool.imap(_encode_task, _tasks(docs, mode)))  # imap keeps corpus order
    return n_tok, n_docs


# ---------------------------------------------------------------------------- entries
@dataclass
class Prepared:
    dir: Path
    meta: dict[str, Any]
    reused: bool

    def splits(self) -> TokenSplits:
        dtype = np.dtype(self.meta["dtype"])

        def open_split(name: str) -> np.ndarray:
            n = self.meta[name]["tokens"]
            if n == 0:  # np.memmap cannot map an empty file
                return np.zeros(0, dtype=dtype)
            return np.memmap(self.dir / f"{name}.bin", dtype=dtype, mode="r", shape=(n,))

        return TokenSplits(
            train=open_split("train"),
            val=open_split("val"),
            n_docs=self.meta["documents"],
            val_bytes=self.meta["val"]["bytes"],
        )


def _check_entry(entry: Path, tok: Tokenizer, source_fp: str) -> str | None:
    """Why the entry cannot be used for this source and tokenizer (None: it can)."""
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return "its metadata is missing or unreadable"
    if meta.get("format") != FORMAT:
        return f"it has format {meta.get('format')}, not {FORMAT}"
    if meta.get("tokenizer", {}).get("fingerprint") != tok.fingerprint():
        return (
            f"it was prepared with another tokenizer ({meta.get('tokenizer', {}).get('name')} "
            f"{meta.get('tokenizer', {}).get('fingerprint')}, not {tok.name} {tok.fingerprint()})"
        )
    if meta.get("source", {}).get("fingerprint") != source_fp:
        return f"it was prepared from another source ({meta.get('source', {}).get('path')})"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for name in ("train", "val"):
        f = entry / f"{name}.bin"
        if not f.exists() or f.stat().st_size != meta[name]["tokens"] * itemsize:
            return f"{f.name} is missing or has the wrong size"
    return None


def prepare(
    data: Any, tok: Tokenizer, *, docs: Callable[[], list[str]] | None = None, force: bool = False, verbose: bool = True
) -> Prepared:
    """The prepared entry for `data` (a DataConfig) and `tok`, built if missing or stale.
    `docs()` returns the documents if the caller has (or can cache) them; else they are read.

    If `data.cache_dir` is itself an entry (holds meta.json), it is used as is and must match:
    a mismatch is an error rather than a silent re-prepare into a directory the user named.
    """
    if not 0.0 <= data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")
    source_fp = source_fingerprint(data)
    root = cache_root(data.cache_dir)
    if (root / META).exists():
        why = _check_entry(root, tok, source_fp)
        if why:
            raise UserError(
                f"data.cache_dir {root} holds prepared data that does not match this run: {why}; "
                "point data.cache_dir at a cache root (or an empty directory) instead"
            )
        return Prepared(root, json.loads((root / META).read_text()), reused=True)
    entry = root / "prepared" / entry_key(data, tok)
    if not force and entry.exists():
        if _check_entry(entry, tok, source_fp) is None:
            return Prepared(entry, json.loads((entry / META).read_text()), reused=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        meta = _build(data, tok, tmp, source_fp, docs)
        if entry.exists():  # stale (or forced): replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
            fsync_dir(entry.parent)
        except OSError:  # another process finished the same entry first: use theirs
            if _check_entry(entry, tok, source_fp) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        mb = meta["source"]["chars"] / 1e6
        print(
            f"prepared {data.path}: {meta['documents']:,} documents, {meta['train']['tokens']:,} train / "
            f"{meta['val']['tokens']:,} val tokens ({meta['dtype']}) in {meta['seconds']:.1f}s "
            f"({mb / max(meta['seconds'], 1e-9):.1f}M chars/s) -> {entry}",
            flush=True,
        )
    return Prepared(entry, meta, reused=False)


def _build(
    data: Any, tok: Tokenizer, tmp: Path, source_fp: str, docs_fn: Callable[[], list[str]] | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    if docs_fn is not None:
        docs = docs_fn()
    else:
        docs = read_documents(data.path, data.text_field, data.encoding_errors, data.doc_pattern)
    dtype = np.dtype(token_dtype(tok.vocab_size))
    total_chars = sum(len(d) for d in docs)
    # Several documents split by document (the last val_fraction of them validate), as in
    # corpus.split_tokens; one document is written whole and split by position afterwards.
    if len(docs) > 1:
        n_val = int(round(len(docs) * data.val_fraction))
        n_val = max(1, n_val) if data.val_fraction > 0 else 0
        parts = {"train": docs[: len(docs) - n_val], "val": docs[len(docs) - n_val :]}
    else:
        parts = {"train": docs, "val": []}
    counts = {}
    with _progress(total_chars, f"tokenizing {data.path}") as bar:
        for name, part in parts.items():
            with open(tmp / f"{name}.bin", "wb") as out:
                counts[name] = _write_tokens(part, tok, out, data.num_proc, bar)
    if len(docs) == 1:
        n = counts["train"][0]
        cut = int(n * (1 - data.val_fraction))
        with open(tmp / "train.bin", "r+b") as f:
            f.seek(cut * dtype.itemsize)
            tail = f.read()
            f.truncate(cut * dtype.itemsize)
        (tmp / "val.bin").write_bytes(tail)
        val = np.frombuffer(tail, dtype=dtype)
        # Bytes of the validation text: decode is exact for the tokenizers we ship.
        val_bytes = len(tok.decode(val.tolist()).encode("utf-8"))
        counts = {"train": (cut, 1), "val": (n - cut, 0)}
    else:
        val_bytes = sum(len(d.encode("utf-8")) for d in parts["val"])
    meta = {
        "format": FORMAT,
        "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size},
        "dtype": dtype.name,
        "source": {
            "path": data.path,
            "fingerprint": source_fp,
            "chars": total_chars,
            "text_field": data.text_field,
            "doc_pattern": data.doc_pattern,
            "encoding_errors": data.encoding_errors,
        },
        "split": {"val_fraction": data.val_fraction, "by": "position" if len(docs) == 1 else "document"},
        "documents": len(docs),
        "train": {"file": "train.bin", "tokens": counts["train"][0], "documents": counts["train"][1]},
        "val": {"file": "val.bin", "tokens": counts["val"][0], "documents": counts["val"][1], "bytes": val_bytes},
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Written last: an entry without meta.json is never used.
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    fsync_tree(tmp)  # every file on disk before the rename publishes the entry
    return meta
