"""Prepared data: a corpus tokenized once into memory-mappable token files, reused across runs.

    <cache root>/prepared/<key>/train.bin, val.bin   raw uint16 (vocab < 65,536) or uint32 tokens
    <cache root>/prepared/<key>/meta.json            written last: its presence means "complete"

The key hashes the source (file paths, sizes, mtimes, and the content of small files), the
settings that change the documents or the split, and the tokenizer's fingerprint, so a changed
source or another tokenizer lands in another directory and is never mixed with old shards; the
metadata is checked again on load. An entry is built in a temporary directory that is renamed
into place when complete, so an interrupted prepare is never mistaken for a finished one.

The cache root is `data.cache_dir`, else $LLMTRAIN_CACHE_DIR, else ~/.cache/llmtrain. The split
is `corpus.split_documents` (by characters, at a document boundary when one is near, or
data.val_path whole), and the tokens are identical to `corpus.split_tokens`: documents are
only cut at newlines, and encoded the same way (`corpus.encode_texts`).
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

from llmtrain.data.corpus import DocSplit, TokenSplits, encode_mode, encode_texts, read_split, token_dtype, unk_count
from llmtrain.data.sources import HF_PREFIX, parse_hf_spec, resolve_files
from llmtrain.errors import UserError
from llmtrain.files import fsync_dir, fsync_tree
from llmtrain.tokenizers import Tokenizer, tokenizer_from_state

FORMAT = 2  # 2: split by characters (corpus.split_documents), <unk> counts
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


def source_files(path: str) -> list[Path]:
    """The local files a data source reads (none for a hub dataset, which is named by its name)."""
    if path.startswith(HF_PREFIX):
        name, _, _ = parse_hf_spec(path)
        local = Path(name).expanduser()
        return resolve_files(str(local)) if local.is_dir() else []
    return resolve_files(path)


def source_fingerprint(data: Any) -> str:
    """Identifies the documents `data` (a DataConfig) reads, data.val_path's included, without
    reading big files."""
    if getattr(data, "sources", None):  # a mixture (its tokenizer's cache key): every source's, in order
        from llmtrain.data.mixture import source_data

        return sha_of([source_fingerprint(source_data(data, s)) for s in data.sources])[:16]
    if not data.path:
        raise UserError("data.path is not set (e.g. data=text data.path=FILE)")
    sources = [data.path] + ([data.val_path] if getattr(data, "val_path", None) else [])
    entries = []
    for path in sources:
        for f in source_files(path):
            st = f.stat()
            entry = [str(f.resolve()), st.st_size, st.st_mtime_ns]
            if st.st_size <= SMALL_FILE_BYTES:
                entry.append(hashlib.sha256(f.read_bytes()).hexdigest())
            entries.append(entry)
        entries.append("|")  # where data.path's files end and data.val_path's begin
    # Settings that change which documents are read (files are named by their resolved paths
    # above, so "data/x.txt" and "./data/x.txt" share an entry).
    hub = [p if p.startswith(HF_PREFIX) else None for p in sources]
    settings = [hub[0], data.text_field, data.doc_pattern, data.encoding_errors]
    if len(sources) > 1:
        settings.append(hub[1])
    return sha_of([settings, entries])[:16]


def split_key(data: Any) -> list[Any]:
    """What decides the train / validation split of a source (the prepared entry and the
    automatically trained tokenizer, which sees the training side only, are keyed by it)."""
    if getattr(data, "val_path", None):
        return [FORMAT, "val_path"]
    return [FORMAT, float(data.val_fraction)]


def entry_key(data: Any, tokenizer: Tokenizer) -> str:
    return f"{sha_of([source_fingerprint(data), split_key(data)])[:16]}-{tokenizer.fingerprint()}"


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


def _tasks(docs: list[str], mode: str, open_end: bool = False) -> Iterator[tuple[str, list[tuple[str, bool]]]]:
    """(mode, groups of (piece, ends_document)) of about CHUNK_CHARS characters, in corpus order;
    `open_end`: the last document continues on the other side of the split (no eos)."""
    cut = mode != "whole"
    group: list[tuple[str, bool]] = []
    size = 0
    for d, doc in enumerate(docs):
        pieces = list(_pieces(doc, cut))
        ends_doc = not (open_end and d == len(docs) - 1)
        for i, piece in enumerate(pieces):
            group.append((piece, ends_doc and i == len(pieces) - 1))
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


def _encode_task(
    task: tuple[str, list[tuple[str, bool]]], tok: Tokenizer | None = None
) -> tuple[np.ndarray, int, int, int]:
    """-> (token ids with eos after each finished document, documents finished, characters, <unk> tokens)."""
    tok = tok or _worker_tok
    assert tok is not None
    mode, pieces = task
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    seqs = encode_texts(tok, [piece for piece, _ in pieces], mode, dtype)
    parts = chain.from_iterable((ids, eos) if ends else (ids,) for ids, (_, ends) in zip(seqs, pieces))
    arr = np.concatenate(list(parts)) if pieces else np.zeros(0, dtype=dtype)
    return arr, sum(e for _, e in pieces), sum(len(p) for p, _ in pieces), unk_count(arr, tok)


def _progress(total_chars: int, what: str):
    from tqdm import tqdm

    # disable=None: only on a terminal, so logs and captured output stay clean.
    return tqdm(
        total=total_chars, unit="char", unit_scale=True, desc=what, disable=None, file=sys.stderr, dynamic_ncols=True
    )


def _write_tokens(
    docs: list[str], tok: Tokenizer, out, num_proc: int, bar, open_end: bool = False
) -> tuple[int, int, int]:
    """Tokenize `docs` into the open binary file `out`; -> (tokens, documents, <unk> tokens)."""
    mode = encode_mode(tok)
    n_tok = n_docs = n_unk = 0
    t0 = time.perf_counter()

    def consume(results):
        nonlocal n_tok, n_docs, n_unk
        for arr, done, chars, unk in results:
            out.write(arr.tobytes())
            n_tok += len(arr)
            n_docs += done
            n_unk += unk
            bar.update(chars)
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{n_docs / dt:,.0f} docs/s, {n_tok / dt:,.0f} tokens/s", refresh=False)

    # Worker processes cost a start-up and a word cache each: only worth it for larger corpora.
    if num_proc <= 1 or sum(map(len, docs)) < 4 * CHUNK_CHARS:
        consume(_encode_task(t, tok) for t in _tasks(docs, mode, open_end))
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(num_proc, _init_worker, (tok.state(),)) as pool:
            consume(pool.imap(_encode_task, _tasks(docs, mode, open_end)))  # imap keeps corpus order
    return n_tok, n_docs, n_unk


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
            by=self.meta["split"]["by"],
            unk=self.meta["train"]["unk"] + self.meta["val"]["unk"],
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
    data: Any, tok: Tokenizer, *, split: Callable[[], DocSplit] | None = None, force: bool = False, verbose: bool = True
) -> Prepared:
    """The prepared entry for `data` (a DataConfig) and `tok`, built if missing or stale.
    `split()` returns the split documents if the caller has (or can cache) them; else they are read.

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
        meta = _build(data, tok, tmp, source_fp, split)
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
            f"prepared {data.path}: {meta['documents']:,} documents, {describe(meta)} ({meta['dtype']}) in "
            f"{meta['seconds']:.1f}s ({mb / max(meta['seconds'], 1e-9):.1f}M chars/s) -> {entry}",
            flush=True,
        )
    return Prepared(entry, meta, reused=False)


def describe(meta: dict[str, Any]) -> str:
    """The split of a prepared entry, as the start-up lines show it."""
    n_train, n_val = meta["train"]["tokens"], meta["val"]["tokens"]
    frac = n_val / max(n_train + n_val, 1)
    return f"{n_train:,} train / {n_val:,} val tokens (val {100 * frac:.1f}%, split {meta['split']['by']})"


def _build(
    data: Any, tok: Tokenizer, tmp: Path, source_fp: str, split_fn: Callable[[], DocSplit] | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ds = split_fn() if split_fn is not None else read_split(data)
    dtype = np.dtype(token_dtype(tok.vocab_size))
    total_chars = sum(len(d) for d in ds.train) + sum(len(d) for d in ds.val)
    counts = {}
    with _progress(total_chars, f"tokenizing {data.path}") as bar:
        for name, part, open_end in (("train", ds.train, ds.cut_inside), ("val", ds.val, False)):
            with open(tmp / f"{name}.bin", "wb") as out:
                counts[name] = _write_tokens(part, tok, out, data.num_proc, bar, open_end)
    val_bytes = sum(len(d.encode("utf-8")) for d in ds.val)
    n_docs = len(ds.train) + len(ds.val) - int(ds.cut_inside)
    meta = {
        "format": FORMAT,
        "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size},
        "dtype": dtype.name,
        "source": {
            "path": data.path,
            "val_path": getattr(data, "val_path", None),
            "fingerprint": source_fp,
            "chars": total_chars,
            "text_field": data.text_field,
            "doc_pattern": data.doc_pattern,
            "encoding_errors": data.encoding_errors,
        },
        "split": {"val_fraction": data.val_fraction, "by": ds.by},
        "documents": n_docs,
        "train": {
            "file": "train.bin",
            "tokens": counts["train"][0],
            "documents": counts["train"][1],
            "unk": counts["train"][2],
        },
        "val": {
            "file": "val.bin",
            "tokens": counts["val"][0],
            "documents": counts["val"][1],
            "bytes": val_bytes,
            "unk": counts["val"][2],
        },
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Written last: an entry without meta.json is never used.
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    fsync_tree(tmp)  # every file on disk before the rename publishes the entry
    return meta
