"""Prepared data: a corpus tokenized once into memory-mappable token shards, reused across runs.

    <cache root>/prepared/<key>/train-00000.bin ...  raw uint16 (vocab < 65,536) or uint32 tokens,
    <cache root>/prepared/<key>/val-00000.bin ...    SHARD_TOKENS each (a split's last: the rest)
    <cache root>/prepared/<key>/meta.json            written last: its presence means "complete"

The key hashes the source (file paths, sizes, mtimes, and the content of small files), the
settings that change the documents or the split, and the tokenizer's fingerprint, so a changed
source or another tokenizer lands in another directory and is never mixed with old shards; the
metadata is checked again on load. An entry is built in <key>.partial/, renamed into place when
complete, so an interrupted prepare is never mistaken for a finished one.

Memory stays bounded whatever the corpus size: the source is streamed twice, once to count each
document's characters (all the split needs) and once to tokenize, in pieces cut after newlines
(sources.iter_pieces), with at most a few pieces in flight per worker and one shard buffered.
Each finished shard is written atomically and then recorded in <key>.partial/manifest.json with
the position to continue from (task number, tokens of that task already written), so a prepare
that is killed resumes at its last shard and gives the same shards as an uninterrupted one.

The cache root is `data.cache_dir`, else $LLMTRAIN_CACHE_DIR, else ~/.cache/llmtrain. The split
is `corpus.split_documents` (by characters, at a document boundary when one is near, or
data.val_path whole), and the tokens are identical to `corpus.split_tokens`: documents are
only cut at newlines, and encoded the same way (`corpus.encode_texts`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections import deque
from dataclasses import dataclass
from itertools import accumulate, chain
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from llmtrain.data.corpus import DocSplit, TokenSplits, encode_mode, encode_texts, split_point, token_dtype, unk_count
from llmtrain.data.sources import HF_PREFIX, iter_pieces, parse_hf_spec, plain_text_counts, resolve_files
from llmtrain.data.tokens import ShardedTokens, open_shard
from llmtrain.errors import UserError
from llmtrain.files import TMP_MARK, atomic_replace, atomic_write, fsync_dir, fsync_tree, tmp_name
from llmtrain.process_memory import resident_bytes
from llmtrain.threads import usable_cores
from llmtrain.tokenizers import Tokenizer, tokenizer_from_state

FORMAT = 3  # 2: split by characters (corpus.split_documents), <unk> counts; 3: fixed-size shards
META = "meta.json"
MANIFEST = "manifest.json"
# Tokens per shard (32 MiB of uint16): the most work a killed prepare loses.
SHARD_TOKENS = 1 << 24
# The most characters of the training split a tokenizer is trained on (spread over the split).
TOKENIZER_SAMPLE_CHARS = 200 << 20
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


# ------------------------------------------------------------------------- the split
@dataclass
class Plan:
    """What the counting pass learns: where the split falls (corpus.split_point) and the size."""

    k: int  # documents of data.path before the cut
    offset: int  # characters of document k on the training side (0: the cut is between documents)
    by: str
    n_docs: int  # documents in all (data.val_path's included)
    bytes: int  # UTF-8 bytes of all text, for the progress bar
    chars: int
    train_chars: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


_plans: dict[str, Plan] = {}  # counting passes already made in this process (tokenizer, then prepare)


def _pieces_of(data: Any, path: str, key: str = "data.path") -> Iterator[tuple[str, bool]]:
    return iter_pieces(path, data.text_field, data.encoding_errors, data.doc_pattern, key)


def _piece_counts(data: Any, path: str, key: str) -> Iterator[tuple[int, int, bool]]:
    """(characters, UTF-8 bytes, ends_document) of each piece of `path`: a whole document at a
    time for plain text files, counted on their bytes without decoding (sources.count_text_file)."""
    counted = plain_text_counts(path, data.text_field, data.encoding_errors, data.doc_pattern)
    if counted is not None:
        for chars, nbytes in counted:
            yield chars, nbytes, True
        return
    for piece, ends in _pieces_of(data, path, key):
        _trim_heap()  # the counting pass's blocks fragment the heap as the encoding's do
        yield len(piece), len(piece.encode("utf-8", "surrogatepass")), ends


def plan_split(data: Any) -> Plan:
    """The counting pass: each document's length in characters, without holding any text."""
    memo = sha_of([source_fingerprint(data), split_key(data)])
    if memo in _plans:
        return _plans[memo]
    bound_malloc_if_large(data)
    lengths = array("q")
    n = nbytes = 0
    for piece_chars, piece_bytes, ends in _piece_counts(data, data.path, "data.path"):
        n += piece_chars
        nbytes += piece_bytes
        if ends:
            lengths.append(n)
            n = 0
    chars = sum(lengths)
    n_docs = len(lengths)
    if getattr(data, "val_path", None):
        k, offset, by = len(lengths), 0, "val_path"
        for piece_chars, piece_bytes, ends in _piece_counts(data, data.val_path, "data.val_path"):
            chars += piece_chars
            nbytes += piece_bytes
            n_docs += ends
    else:
        k, offset, by = split_point(lengths, data.val_fraction)
    train_chars = sum(lengths[:k]) + offset
    plan = Plan(k, offset, by, n_docs, nbytes, chars, train_chars)  # a document cut in two counts once
    _plans[memo] = plan
    return plan


def split_stream(data: Any, plan: Plan) -> Iterator[tuple[str, str, bool]]:
    """(split, piece, ends_document) over the corpus in order: the training side, then validation."""
    d = pos = 0  # document index and characters of it already passed
    for piece, ends in _pieces_of(data, data.path):
        if d < plan.k:
            yield "train", piece, ends
        elif d == plan.k and plan.offset and pos < plan.offset:
            cut = plan.offset - pos
            if cut >= len(piece):
                yield "train", piece, False
            else:
                yield "train", piece[:cut], False  # no eos: the document continues in validation
                yield "val", piece[cut:], ends
        else:
            yield "val", piece, ends
        pos += len(piece)
        if ends:
            d, pos = d + 1, 0
    if getattr(data, "val_path", None):
        for piece, ends in _pieces_of(data, data.val_path, "data.val_path"):
            yield "val", piece, ends


def _docsplit_stream(ds: DocSplit) -> Iterator[tuple[str, str, bool]]:
    for name, docs, open_end in (("train", ds.train, ds.cut_inside), ("val", ds.val, False)):
        for i, doc in enumerate(docs):
            yield name, doc, not (open_end and i == len(docs) - 1)


def _docsplit_plan(ds: DocSplit) -> Plan:
    chars = sum(map(len, ds.train)) + sum(map(len, ds.val))
    nbytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in chain(ds.train, ds.val))
    n_docs = len(ds.train) + len(ds.val) - int(ds.cut_inside)
    return Plan(len(ds.train), 0, ds.by, n_docs, nbytes, chars, sum(map(len, ds.train)))


def tokenizer_sample(data: Any) -> list[str]:
    """The training split's documents for training a tokenizer: all of them when they hold at most
    TOKENIZER_SAMPLE_CHARS characters (the documents read_split gives), else evenly spread pieces
    of about CHUNK_CHARS adding up to that much, so memory stays bounded on a huge corpus."""
    plan = plan_split(data)
    stride = max(1, -(-plan.train_chars // TOKENIZER_SAMPLE_CHARS))
    out: list[str] = []
    unit: list[str] = []
    size = i = 0
    for name, piece, ends in split_stream(data, plan):
        if name != "train":
            break
        if i % stride == 0:
            unit.append(piece)
        size += len(piece)
        if ends or (stride > 1 and size >= CHUNK_CHARS):
            if unit:
                out.append("".join(unit))
            unit, size, i = [], 0, i + 1
    if unit:
        out.append("".join(unit))
    return out


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


Task = tuple[str, str, list[tuple[str, bool]]]  # (split, encode mode, [(piece, ends_document)])


def make_tasks(stream: Iterator[tuple[str, str, bool]], mode: str) -> Iterator[tuple[Task, int]]:
    """(task, UTF-8 bytes of a validation task) groups of about CHUNK_CHARS characters in corpus
    order, one split each.
    Mode "whole" may not cut a document, so its pieces are joined first."""
    group: list[tuple[str, bool]] = []
    size = nbytes = 0
    current = "train"
    held: list[str] = []  # "whole": the pieces of the document so far

    def add(piece: str, ends: bool) -> Iterator[tuple[Task, int]]:
        nonlocal group, size, nbytes
        group.append((piece, ends))
        size += len(piece)
        if current == "val":  # exact, for bits per byte (training progress is counted in characters)
            nbytes += len(piece.encode("utf-8", "surrogatepass"))
        if size >= CHUNK_CHARS:
            yield (current, mode, group), nbytes
            group, size, nbytes = [], 0, 0

    for name, text, ends in stream:
        if name != current:
            if held:  # the training side's open end: a document that continues in validation
                yield from add("".join(held), False)
                held = []
            if group:
                yield (current, mode, group), nbytes
                group, size, nbytes = [], 0, 0
            current = name
        if mode == "whole":
            held.append(text)
            if not ends:
                continue
            text, held = "".join(held), []
        pieces = list(_pieces(text, mode != "whole"))
        for i, piece in enumerate(pieces):
            yield from add(piece, ends and i == len(pieces) - 1)
    if held:
        yield from add("".join(held), False)
    if group:
        yield (current, mode, group), nbytes


_worker_tok: Tokenizer | None = None


def _init_worker(state: dict[str, Any], num_proc: int) -> None:
    global _worker_tok
    HEAP_TRIM.update(count=0, ceiling=0)  # a worker's ceiling is its own RSS's, not its parent's
    _worker_tok = tokenizer_from_state(state)
    # num_proc workers share the cores: a sentencepiece encoder per worker taking every core
    # oversubscribes them (2 workers on 2 cores ran at half the speed of one process).
    if hasattr(_worker_tok, "encode_threads"):
        _worker_tok.encode_threads = max(1, usable_cores() // num_proc)


def encode_task(task: Task, tok: Tokenizer | None = None) -> np.ndarray:
    """-> the token ids of the task's pieces, with eos after each finished document."""
    tok = tok or _worker_tok
    assert tok is not None
    _trim_heap()
    _, mode, pieces = task
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    seqs = encode_texts(tok, [piece for piece, _ in pieces], mode, dtype)
    parts = chain.from_iterable((ids, eos) if ends else (ids,) for ids, (_, ends) in zip(seqs, pieces))
    arr = np.concatenate(list(parts)) if pieces else np.zeros(0, dtype=dtype)
    return arr


def _progress(total_bytes: int, what: str, initial: int = 0):
    from tqdm import tqdm

    # disable=None: only on a terminal, so logs and captured output stay clean. Bytes of text:
    # tqdm shows MB/s and the ETA.
    return tqdm(
        total=total_bytes,
        initial=initial,
        unit="B",
        unit_scale=True,
        desc=what,
        disable=None,
        file=sys.stderr,
        dynamic_ncols=True,
    )


# Tasks queued per worker before the main process considers encoding one itself, and tasks in
# flight per process before it waits for the oldest (memory stays bounded whatever the corpus).
# 2 queued let a worker run dry while the main encoded one of its own: 0.3-0.4 s idle of a 3 s
# run at 300 MB, against 0.01-0.02 s with 4.
WORKER_QUEUE = 4
IN_FLIGHT = 4


def _task_file(task: Task, out_dir: str) -> tuple[str, str, str, array, bytes]:
    """A task for a worker: its text in a file in out_dir, and the rest (split, mode, piece lengths,
    ends). A file rather than the pipe: the pool's task thread writes a 1 MB task into the 64 KB
    pipe in pieces, retaking the GIL from the encoding main thread for each (up to 5 ms apiece):
    at 300 MB the worker waited 2.6 ms per task (median) and 0.5 s of a 3.4 s run; 0.15 ms so."""
    name, mode, pieces = task
    fd, path = tempfile.mkstemp(dir=out_dir, suffix=".text")
    with os.fdopen(fd, "wb") as f:
        f.write("".join(p for p, _ in pieces).encode("utf-8", "surrogatepass"))  # any str round-trips
    return path, name, mode, array("q", (len(p) for p, _ in pieces)), bytes(e for _, e in pieces)


def _worker_encode(job: tuple[str, str, str, array, bytes], out_dir: str) -> tuple[str, str] | None:
    """encode_task in a worker on a _task_file job: (a file in out_dir holding the tokens, their
    dtype), or None when the main process took the task back first (_encoded's tail). Tokens go
    back in a file too: a worker sending its tokens waits until the main process's result thread
    reads them, which needs the GIL the main thread holds while it encodes (about 10 ms lost per
    task, a fifth of the worker's time at 1 GB)."""
    path, name, mode, lengths, ends = job
    claimed = path + ".claimed"
    try:
        os.rename(path, claimed)  # atomic: the worker or the main process takes it, never both
    except FileNotFoundError:
        return None
    with open(claimed, "rb") as f:
        text = f.read().decode("utf-8", "surrogatepass")
    os.unlink(claimed)
    cuts = [0, *accumulate(lengths)]
    arr = encode_task((name, mode, [(text[a:b], bool(e)) for a, b, e in zip(cuts, cuts[1:], ends)]))
    fd, out = tempfile.mkstemp(dir=out_dir, suffix=".tokens")
    with os.fdopen(fd, "wb") as f:
        f.write(arr.data)
    return out, arr.dtype.str


def _take_back(path: str) -> bool:
    """Whether the main process took back a task handed to a worker that has not started it."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _collect(result: tuple[str, str]) -> np.ndarray:
    path, dtype = result
    try:
        return np.fromfile(path, dtype=np.dtype(dtype))
    finally:
        os.unlink(path)


class _Handed(NamedTuple):
    """A task handed to the workers: the task (to take back), its text file, the worker's result."""

    task: Task
    path: str
    result: AsyncResult


def _encoded(
    tasks: Iterator[Task], tok: Tokenizer, num_proc: int, parallel: bool, scratch: Path
) -> Iterator[np.ndarray]:
    """The tokens of each task, in order, from num_proc - 1 workers and the main process: the
    main process hands each task to the workers while fewer than WORKER_QUEUE per worker are
    queued, and otherwise encodes it itself, so num_proc processes stay busy on num_proc cores
    and the main process's own work (reading, writing the shards) is balanced against the
    workers' instead of a fixed share (a fixed 1-in-num_proc share left the worker idle: 1.31x at
    1 GB; balancing on CPU seconds instead left both processes waiting on each other). Tasks
    and tokens go to and from the workers in files (_task_file, _worker_encode). At most
    IN_FLIGHT * num_proc tasks are in flight, so memory does not grow with the corpus (Pool.imap
    would read the whole input ahead)."""
    if num_proc <= 1 or not parallel:
        for t in tasks:
            yield encode_task(t, tok)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # The first task is encoded here before the fork: the workers inherit what the encoder
    # imports (pyarrow: ~0.1 s) and the words it has encoded (sentencepiece's
    # share of a 100 MB corpus, otherwise paid again by every worker).
    tasks = iter(tasks)
    first = next(tasks, None)
    if first is None:
        return
    first_ids = encode_task(first, tok)
    threads = getattr(tok, "encode_threads", None)
    if hasattr(tok, "encode_threads"):
        tok.encode_threads = max(1, usable_cores() // num_proc)
    workers = num_proc - 1
    # tasks' text and tokens, until read: in `scratch` (the entry's work directory), whose
    # leftovers a resumed prepare removes, so a killed run leaves nothing behind in /tmp
    out_dir = str(tmp_name(scratch / "encoded"))
    os.mkdir(out_dir)
    try:
        with mp.get_context(method).Pool(workers, _init_worker, (tok.state(), num_proc)) as pool:
            pending: deque[np.ndarray | _Handed] = deque([first_ids])  # in task order

            def ready(p: np.ndarray | _Handed) -> bool:
                return isinstance(p, np.ndarray) or p.result.ready()

            def oldest() -> np.ndarray:
                done = pending.popleft()
                return done if isinstance(done, np.ndarray) else _collect(done.result.get())

            for t in tasks:
                if sum(not ready(p) for p in pending) < WORKER_QUEUE * workers:
                    job = _task_file(t, out_dir)
                    pending.append(_Handed(t, job[0], pool.apply_async(_worker_encode, (job, out_dir))))
                else:  # the workers have enough to do: encode this one here rather than wait
                    pending.append(encode_task(t, tok))
                while pending and (ready(pending[0]) or len(pending) >= IN_FLIGHT * num_proc):
                    yield oldest()
            # The tail: up to WORKER_QUEUE tasks per worker are still queued. The main process takes
            # back the last one no worker has started (its file is still there) and encodes it,
            # rather than wait while one core works through the queue (80 ms of a 1.2 s run at
            # 100 MB).
            while pending:
                for j in range(len(pending) - 1, -1, -1):
                    p = pending[j]
                    if not ready(p) and _take_back(p.path):
                        pending[j] = encode_task(p.task, tok)
                        break
                else:  # nothing left to take: wait for the oldest
                    yield oldest()
                while pending and ready(pending[0]):
                    yield oldest()
    finally:
        if hasattr(tok, "encode_threads"):
            tok.encode_threads = threads
        shutil.rmtree(out_dir, ignore_errors=True)


class _ShardWriter:
    """Cuts the token stream of one split after another into SHARD_TOKENS shards, appending each
    task's tokens to the shard being written (a temporary file, so memory holds no shard). A full
    shard is published atomically; then the manifest records it and where the next token comes
    from (task, tokens of it already written)."""

    def __init__(self, work: Path, manifest: dict[str, Any], tok: Tokenizer, dtype: np.dtype):
        self.work, self.manifest, self.tok, self.dtype = work, manifest, tok, dtype
        self.size = manifest["shard_tokens"]
        self.file = None  # the open temporary file of the shard being written
        self.n = self.eos = self.unk = 0  # its tokens, documents and <unk> tokens so far
        self.name = "train"

    def add(self, name: str, task: int, arr: np.ndarray, skipped: int = 0) -> None:
        """Append task `task`'s tokens (`skipped` of them, already in a shard, left off)."""
        if name != self.name:
            self.flush(task)
            self.name = name
        pos = 0
        while pos < len(arr):
            part = arr[pos : pos + self.size - self.n].astype(self.dtype, copy=False)
            if self.file is None:
                self.file = open(tmp_name(self._path()), "wb")
            self.file.write(part.tobytes())
            self.n += len(part)
            self.eos += int(np.count_nonzero(part == self.tok.eos_id))
            self.unk += unk_count(part, self.tok)
            pos += len(part)
            if self.n == self.size:
                self._publish(task, skipped + pos) if pos < len(arr) else self._publish(task + 1, 0)

    def flush(self, next_task: int) -> None:
        if self.n:
            self._publish(next_task, 0)

    def _path(self) -> Path:
        return self.work / f"{self.name}-{len(self.manifest['shards'][self.name]):05d}.bin"

    def _publish(self, task: int, skip: int) -> None:
        path = self._path()
        self.file.close()
        atomic_replace(tmp_name(path), path)
        self.manifest["shards"][self.name].append(
            {"file": path.name, "tokens": self.n, "documents": self.eos, "unk": self.unk}
        )
        self.manifest["resume"] = {"task": task, "skip": skip}
        atomic_write(self.work / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")
        self.file, self.n, self.eos, self.unk = None, 0, 0, 0


BOUND_MALLOC_BYTES = 256 << 20  # below this the heap's growth is small: malloc is left alone
# glibc's mmap and trim thresholds while a large source is prepared, and how many pieces counted
# or tasks encoded (about 32 MB of text) each process goes through between two malloc_trim calls
# (each call walks the heap: every 8 tasks cost a tenth of the run).
MALLOC_THRESHOLD = 64 << 20
TRIM_EVERY = 32
# RSS a process may gain over where it stood after its first trim before it trims again early:
# the heap's free space fragments and grows with the corpus (a 1 GB prepare peaked 22% above a
# 100 MB one); trimming only when over this ceiling kept the 1 GB peak at the 100 MB one's with
# 155 trims in 513 tasks, where a flat peak by period took a trim every 2-4 tasks (each trim's
# pages are faulted in again).
TRIM_HEADROOM = 48 << 20
# every = 0: not bounded, never trim; count: _trim_heap calls; ceiling: RSS that triggers a trim
HEAP_TRIM = {"every": 0, "count": 0, "ceiling": 0}


def _bound_malloc() -> None:
    """Keep a large prepare's heap from growing with the corpus, without page faults per task.
    The ~MB temporaries of each task (text, numpy word arrays) come from glibc's heap, whose free
    space fragments and grows slowly (measured: +330 MB RSS at 1 GB). Fixed thresholds of 64 MB
    keep them on the heap (a 128 KB mmap threshold instead mapped and faulted every block
    afresh: 2.9M page faults and 40% of the CPU at 300 MB), and a malloc_trim every TRIM_EVERY
    pieces of the counting pass and tasks encoded (in every process), or sooner once RSS is past
    the ceiling, hands the free pages back.
    The thresholds hold for the rest of the process (pretrain trains after preparing); 64 MB is
    near glibc's own dynamic maximum (32 MB), so training allocates much as it would otherwise."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, MALLOC_THRESHOLD)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
        libc.mallopt(-1, MALLOC_THRESHOLD)  # M_TRIM_THRESHOLD
        libc.malloc_trim  # noqa: B018 - not glibc: AttributeError, nothing is bounded
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    HEAP_TRIM["every"] = TRIM_EVERY


def malloc_trim() -> None:
    """glibc's malloc_trim(0): the heap's free pages back to the system (_bound_malloc checked it is there)."""
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)


def _trim_heap() -> None:
    """malloc_trim every TRIM_EVERY calls (pieces counted, tasks encoded) once _bound_malloc has run
    in this process (or its parent), and at any call where RSS is above the ceiling: the RSS just
    after the first trim plus TRIM_HEADROOM."""
    if not HEAP_TRIM["every"]:
        return
    HEAP_TRIM["count"] += 1
    ceiling = HEAP_TRIM["ceiling"]
    if HEAP_TRIM["count"] % HEAP_TRIM["every"] == 0 or (ceiling and resident_bytes() > ceiling):
        malloc_trim()
        if not ceiling:
            with contextlib.suppress(OSError):  # no /proc: the periodic trims alone
                HEAP_TRIM["ceiling"] = resident_bytes() + TRIM_HEADROOM


def bound_malloc_if_large(data: Any) -> None:
    """_bound_malloc before the first read of a large source (a hub dataset counts as large)."""
    paths = [p for p in (data.path, getattr(data, "val_path", None)) if p]
    files = [f for p in paths for f in source_files(p)]
    if not files or sum(f.stat().st_size for f in files) >= BOUND_MALLOC_BYTES:
        _bound_malloc()


def _build(
    data: Any, tok: Tokenizer, work: Path, source_fp: str, split_fn: Callable[[], DocSplit] | None, key: str
) -> dict[str, Any]:
    t0 = time.perf_counter()
    bound_malloc_if_large(data)
    dtype = np.dtype(token_dtype(tok.vocab_size))
    manifest = None
    try:
        manifest = json.loads((work / MANIFEST).read_text())
    except (OSError, ValueError):
        pass
    if manifest is None or manifest.get("format") != FORMAT or manifest.get("key") != key:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        ds = split_fn() if split_fn is not None else None
        plan = _docsplit_plan(ds) if ds is not None else plan_split(data)
        manifest = {
            "format": FORMAT,
            "key": key,
            "shard_tokens": SHARD_TOKENS,
            "plan": plan.to_json(),
            "from_docsplit": ds is not None,
            "shards": {"train": [], "val": []},
            "resume": {"task": 0, "skip": 0},
        }
        atomic_write(work / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    for leftover in work.glob(f"*{TMP_MARK}*"):  # a shard a killed prepare was writing, its workers' files
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    plan = Plan(**manifest["plan"])
    if manifest["from_docsplit"]:
        ds = split_fn() if split_fn is not None else None
        stream = _docsplit_stream(ds) if ds is not None else split_stream(data, plan)
    else:
        stream = split_stream(data, plan)
    resume = manifest["resume"]
    writer = _ShardWriter(work, manifest, tok, dtype)
    mode = encode_mode(tok)
    val_bytes = 0
    queued: deque[Task] = deque()  # handed to the workers, not yet written

    with _progress(plan.bytes, f"tokenizing {data.path}") as bar:
        per_char = plan.bytes / max(plan.chars, 1)  # the bar shows MB/s of the source

        def todo() -> Iterator[Task]:
            nonlocal val_bytes
            for i, (task, nbytes) in enumerate(make_tasks(stream, mode)):
                val_bytes += nbytes
                if i < resume["task"]:  # already in the shards: read past it
                    bar.update(round(per_char * sum(len(p) for p, _ in task[2])))
                    continue
                queued.append(task)
                yield task

        i = resume["task"]
        parallel = plan.chars >= 4 * CHUNK_CHARS  # worker processes pay a start-up each
        for arr in _encoded(todo(), tok, data.num_proc, parallel, work):
            task = queued.popleft()
            skipped = resume["skip"] if i == resume["task"] else 0
            writer.add(task[0], i, arr[skipped:], skipped)
            bar.update(round(per_char * sum(len(p) for p, _ in task[2])))
            i += 1
        writer.flush(i)
    shards = manifest["shards"]

    def side(name: str) -> dict[str, Any]:
        return {
            "shards": [{"file": s["file"], "tokens": s["tokens"]} for s in shards[name]],
            "tokens": sum(s["tokens"] for s in shards[name]),
            "documents": sum(s["documents"] for s in shards[name]),
            "unk": sum(s["unk"] for s in shards[name]),
        }

    meta = {
        "format": FORMAT,
        "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size},
        "dtype": dtype.name,
        "source": {
            "path": data.path,
            "val_path": getattr(data, "val_path", None),
            "fingerprint": source_fp,
            "chars": plan.chars,
            "bytes": plan.bytes,
            "text_field": data.text_field,
            "doc_pattern": data.doc_pattern,
            "encoding_errors": data.encoding_errors,
        },
        "split": {"val_fraction": data.val_fraction, "by": plan.by},
        "documents": plan.n_docs,
        "shard_tokens": manifest["shard_tokens"],
        "train": side("train"),
        "val": {**side("val"), "bytes": val_bytes},
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (work / MANIFEST).unlink()
    # Written last: an entry without meta.json is never used.
    (work / META).write_text(json.dumps(meta, indent=2) + "\n")
    fsync_tree(work)  # every file on disk before the rename publishes the entry
    return meta


# ---------------------------------------------------------------------------- entries
@dataclass
class Prepared:
    dir: Path
    meta: dict[str, Any]
    reused: bool

    def split_tokens(self, name: str) -> np.ndarray | ShardedTokens:
        """One split's tokens: a read-only memmap (one shard) or a ShardedTokens over its shards."""
        dtype = np.dtype(self.meta["dtype"])
        shards = [open_shard(self.dir / s["file"], dtype, s["tokens"]) for s in self.meta[name]["shards"]]
        if len(shards) == 1:
            return shards[0]
        return ShardedTokens(shards) if shards else np.zeros(0, dtype=dtype)

    def splits(self) -> TokenSplits:
        return TokenSplits(
            train=self.split_tokens("train"),
            val=self.split_tokens("val"),
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
        for s in meta[name]["shards"]:
            f = entry / s["file"]
            if not f.exists() or f.stat().st_size != s["tokens"] * itemsize:
                return f"{f.name} is missing or has the wrong size"
    return None


def prepare(
    data: Any, tok: Tokenizer, *, split: Callable[[], DocSplit] | None = None, force: bool = False, verbose: bool = True
) -> Prepared:
    """The prepared entry for `data` (a DataConfig) and `tok`, built if missing or stale (and
    resumed if an earlier prepare was interrupted). `split()` returns the split documents if the
    caller already holds them in memory; else the source is streamed.

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
    key = entry_key(data, tok)
    entry = root / "prepared" / key
    if not force and entry.exists() and _check_entry(entry, tok, source_fp) is None:
        return Prepared(entry, json.loads((entry / META).read_text()), reused=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = entry.parent / f".{key}.partial"
    # One preparer per entry: a second process waits, then finds the entry done.
    locks = root / "locks"  # beside prepared/, which holds entries (and work in progress) only
    locks.mkdir(exist_ok=True)
    with open(locks / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and entry.exists() and _check_entry(entry, tok, source_fp) is None:
            return Prepared(entry, json.loads((entry / META).read_text()), reused=True)
        if force:
            shutil.rmtree(work, ignore_errors=True)
        resumed = (work / MANIFEST).exists()
        try:
            meta = _build(data, tok, work, source_fp, split, key)
        except UserError:  # a bad source: nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
            raise
        if entry.exists():  # stale (or forced): replace it
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(work, entry)
        fsync_dir(entry.parent)
    if verbose:
        mb = meta["source"]["bytes"] / 1e6
        print(
            f"prepared {data.path}{' (resumed)' if resumed else ''}: {meta['documents']:,} documents, "
            f"{describe(meta)} ({meta['dtype']}, {len(meta['train']['shards']) + len(meta['val']['shards'])} "
            f"shards) in {meta['seconds']:.1f}s ({mb / max(meta['seconds'], 1e-9):.1f} MB/s) -> {entry}",
            flush=True,
        )
    return Prepared(entry, meta, reused=False)


def describe(meta: dict[str, Any]) -> str:
    """The split of a prepared entry, as the start-up lines show it."""
    n_train, n_val = meta["train"]["tokens"], meta["val"]["tokens"]
    frac = n_val / max(n_train + n_val, 1)
    return f"{n_train:,} train / {n_val:,} val tokens (val {100 * frac:.1f}%, split {meta['split']['by']})"
