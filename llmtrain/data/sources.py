"""Read documents from what a user points `data.path` at: a text file (plain or .gz), a
.jsonl/.json/.csv/.tsv/.parquet file with a text field, a directory or a glob, or a Hugging
Face dataset as `hf:NAME[:CONFIG][@SPLIT]` (a hub name, or a local directory of data files).

Every failure is a UserError naming the file: missing, unreadable, not UTF-8 (with the byte
offset), without the configured field, or empty.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import re
from pathlib import Path
from typing import Iterator

from llmtrain.errors import UserError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw", ".tokens", ""}


def resolve_files(path: str) -> list[Path]:
    """A file, a directory (its files, sorted) or a glob pattern -> the files it names."""
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.path {path!r} matches no files")
        return files
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UserError(f"data directory {path} contains no files")
        return files
    if not p.exists():
        raise UserError(f"data file not found: {path}")
    return [p]


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"data file {path} is not valid gzip: {e}") from None
    return raw


# Bytes sampled to tell binary from text, and the share of invalid UTF-8 bytes that marks binary
# (a text file with a few bad bytes is still text: data.encoding_errors=replace reads it).
_SNIFF_BYTES = 1 << 16
_BINARY_INVALID = 0.1
_ESCAPED = re.compile("[\udc80-\udcff]")


def binary_reason(raw: bytes) -> str | None:
    """Why `raw` is not text (NUL bytes, or mostly invalid UTF-8), or None. Text never holds NUL;
    images, executables and weights do."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        return f"a NUL byte at offset {nul}"
    sample = raw[:_SNIFF_BYTES]
    # A sample cut inside a multi-byte character costs at most 3 bad bytes.
    bad = len(_ESCAPED.findall(sample.decode("utf-8", errors="surrogateescape")))
    if sample and bad > 3 and bad / len(sample) > _BINARY_INVALID:
        return f"{100 * bad / len(sample):.0f}% of its first {len(sample):,} bytes are not UTF-8"
    return None


def refuse_binary(path: Path, raw: bytes | bytearray, offset: int = 0) -> None:
    """binary_reason's checks on one block of `path` that starts `offset` bytes in: a NUL byte
    anywhere in it; the share of invalid UTF-8 in the file's first bytes (the block at 0)."""
    nul = raw.find(b"\x00")
    why = f"a NUL byte at offset {offset + nul}" if nul >= 0 else None
    if why is None and offset == 0:
        why = binary_reason(raw[:_SNIFF_BYTES])
    if why:
        raise UserError(f"data file {path} is a binary file, not text ({why}); point at a text file")


def read_text(path: Path, errors: str = "strict") -> str:
    raw = _read_bytes(path)
    refuse_binary(path, raw)
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(
            f"data file {path} is not valid UTF-8 at byte offset {e.start} "
            f"(set data.encoding_errors=replace to accept it)"
        ) from None


def _stem_suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


# JSON's \uXXXX escapes can spell half of a surrogate pair: a Python string, but not text
# (UTF-8 cannot encode it, so every tokenizer would fail on it later, far from the file).
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACE_HINT = " (set data.encoding_errors=replace to accept it)"


def valid_text(value: str, path: object, where: str, errors: str = "strict", hint: str = REPLACE_HINT) -> str:
    """`value`, or a UserError naming the file and record if it holds an unpaired surrogate
    (with errors="replace": those become U+FFFD, as undecodable bytes do)."""
    if value.isascii():
        return value
    m = _SURROGATE.search(value)
    if m is None:
        return value
    if errors == "replace":
        return _SURROGATE.sub("\ufffd", value)
    raise UserError(
        f"{path}: {where} holds an unpaired surrogate \\u{ord(m.group()):04x} at character "
        f"{m.start()}, which is not valid Unicode{hint}"
    )


def _field(record: object, field: str, path: Path, where: str, errors: str = "strict") -> str:
    if not isinstance(record, dict) or field not in record:
        raise UserError(f"{path}: {where} has no field {field!r} (set data.text_field)")
    value = record[field]
    if isinstance(value, list):  # e.g. SciTLDR's list of sentences
        value = " ".join(map(str, value))
    return valid_text(str(value), path, where, errors)


PARQUET_BATCH_ROWS = 4096


def iter_documents(path: Path, text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    """Yield the documents of one file. A plain text file is one document. CSV/TSV and Parquet
    are read a piece at a time; a .json file (one JSON value) is read whole."""
    kind = _stem_suffix(path)
    if kind == ".jsonl":
        for i, line in enumerate(read_text(path, errors).splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
                yield _field(record, text_field, path, f"line {i}", errors)
    elif kind == ".json":
        try:
            data = json.loads(read_text(path, errors))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        records = data if isinstance(data, list) else data.get("data", [data])
        for i, record in enumerate(records):
            yield _field(record, text_field, path, f"record {i}", errors)
    elif kind in (".csv", ".tsv"):
        # streamed: the lines of each ~1 MB piece (pieces end after a newline, so these are the
        # whole text's splitlines()), a row at a time, so a CSV larger than memory can be prepared
        lines = (line for piece in iter_text_pieces(path, errors) for line in piece.splitlines())
        reader = csv.DictReader(lines, delimiter="\t" if kind == ".tsv" else ",")
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            raise UserError(f"{path}: no column {text_field!r} (set data.text_field)")
        for row in reader:
            yield row[text_field] or ""
    elif kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading .parquet needs pyarrow: pip install pyarrow") from None
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise UserError(f"{path}: no column {text_field!r} (set data.text_field)")
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):  # streamed too
            for value in batch.column(0).to_pylist():
                yield "" if value is None else str(value)
    else:
        yield read_text(path, errors)


def split_on_pattern(text: str, pattern: str) -> list[str]:
    """Split a text into documents at every line matching `pattern` (the line starts a document)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"data.doc_pattern {pattern!r} is not a valid regex: {e}") from None
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if rx.match(line) and any(ln.strip() for ln in current):
            docs.append("".join(current))
            current = []
        current.append(line)
    docs.append("".join(current))
    return docs


HF_PREFIX = "hf:"


def parse_hf_spec(path: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][@SPLIT]` -> (name, config, split); the split defaults to train."""
    spec = path[len(HF_PREFIX) :]
    spec, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "train")
    name, _, config = spec.partition(":")
    if not name or not split:
        raise UserError(f"data.path {path!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split


def _quiet_hf() -> None:
    """Failures become one UserError line: silence the libraries' own warnings and retry notes."""
    import logging

    for name in ("datasets", "huggingface_hub", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import huggingface_hub

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        huggingface_hub.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass


def iter_hf_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Stream the text field of a Hugging Face dataset (never downloads it whole)."""
    name, config, split = parse_hf_spec(path)
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.path {path!r} needs the `datasets` package: pip install datasets") from None
    _quiet_hf()
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, record in enumerate(ds):
            yield _field(record, text_field, Path(path), f"record {i}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, unknown name/config/split, bad files: one line
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"data.path {path!r}: cannot load Hugging Face dataset {name!r}: {msg}") from None


def read_documents(
    path: str | None,
    text_field: str = "text",
    errors: str = "strict",
    doc_pattern: str | None = None,
    key: str = "data.path",
) -> list[str]:
    """All non-empty documents under `path` (the value of config key `key`); an empty corpus is an error."""
    if not path:
        raise UserError(f"{key} is not set (e.g. data=text {key}=FILE)")
    if path.startswith(HF_PREFIX):
        docs = list(iter_hf_documents(path, text_field))
    else:
        docs = [d for f in resolve_files(path) for d in iter_documents(f, text_field, errors)]
    if doc_pattern:
        docs = [part for d in docs for part in split_on_pattern(d, doc_pattern)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data {path} is empty (no non-whitespace text)")
    return docs


# ------------------------------------------------------------------------ streaming
# Text is read in blocks of this many bytes and handed on in pieces that end after a newline,
# so a corpus far larger than memory (even one multi-gigabyte document) streams through.
BLOCK_BYTES = 1 << 20


def _open_binary(path: Path):
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None


def iter_text_pieces(path: Path, errors: str = "strict") -> Iterator[str]:
    """The text of one file in pieces of about BLOCK_BYTES, each ending after a newline (the last
    one where the file ends), with read_text's checks: binary, not UTF-8 (with the byte offset)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    carry = ""
    offset = 0  # bytes of the file before this block
    # One buffer for every block: a fresh 1 MB bytes object per read faulted its pages in anew
    # each time (most of the read time while preparing 1 GB).
    buf = bytearray(BLOCK_BYTES)
    with _open_binary(path) as f:
        while True:
            try:
                n = f.readinto(buf)
                raw = buf if n == len(buf) else buf[:n]
            except (OSError, EOFError) as e:
                if path.suffix == ".gz":
                    raise UserError(f"data file {path} is not valid gzip: {e}") from None
                raise UserError(f"cannot read data file {path}: {e}") from None
            refuse_binary(path, raw, offset)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"data file {path} is not valid UTF-8 at byte offset {offset - pending + e.start} "
                    f"(set data.encoding_errors=replace to accept it)"
                ) from None
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut:
                yield text[:cut]
            carry = text[cut:]


COUNT_BLOCK_BYTES = 16 << 20
_ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _has_text(path: Path) -> bool:
    """Whether the file holds a character that str.strip would keep. Usually decided by its first
    bytes; only a file of whitespace is read to the end (one character at a time past ASCII)."""
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 16)
            if not block:
                return False
            rest = block.lstrip(_ASCII_SPACE)
            if not rest:
                continue
            if rest[0] < 0x80:
                return True
            # a non-ASCII character: decode the rest of the file as iter_text_pieces would
            text = (rest + f.read()).decode("utf-8", errors="replace")
            return bool(text.strip())


def count_text_file(path: Path, errors: str) -> tuple[int, int] | None:
    """(characters, UTF-8 bytes) of what iter_pieces yields for one plain, uncompressed text file,
    counted on its bytes without decoding them: every byte but a UTF-8 continuation byte
    (0x80-0xBF) starts a character. (0, 0): whitespace only, which is no document. None: not such
    a file (another format, compressed, or data.encoding_errors other than strict, where invalid
    bytes change the count); count it by decoding. The binary checks run here as when reading;
    a file that is not valid UTF-8 is counted as if it were and reported by the tokenizing pass.

    Written by hand because the counting pass decoded and re-encoded the whole corpus to learn
    two numbers: at 1 GB that was seconds of one process while the workers waited."""
    import numpy as np

    if errors != "strict" or path.suffix == ".gz" or _stem_suffix(path) not in TEXT_SUFFIXES:
        return None
    try:
        chars = 0
        with open(path, "rb") as f:
            offset = 0
            while True:
                raw = f.read(COUNT_BLOCK_BYTES)
                if not raw:
                    break
                refuse_binary(path, raw, offset)
                signed = np.frombuffer(raw, dtype=np.int8)  # continuation bytes are -128..-65
                chars += len(raw) - int(np.count_nonzero(signed < -64))
                offset += len(raw)
        if not _has_text(path):
            return 0, 0
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None
    return chars, offset


def plain_text_counts(path: str, text_field: str, errors: str, doc_pattern: str | None) -> list[tuple[int, int]] | None:
    """Each document's (characters, UTF-8 bytes) as iter_pieces would yield them, when every file
    of `path` is one plain text document (count_text_file); None otherwise."""
    if doc_pattern or path.startswith(HF_PREFIX):
        return None
    out = []
    for f in resolve_files(path):
        counts = count_text_file(f, errors)
        if counts is None:
            return None
        if counts[0]:
            out.append(counts)
    if not out:
        raise UserError(f"data {path} is empty (no non-whitespace text)")
    return out


def _pattern_docs(pieces: Iterator[str], pattern: str) -> Iterator[Iterator[str]]:
    """split_on_pattern over a stream of pieces: each document as a one-piece iterator."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"data.doc_pattern {pattern!r} is not a valid regex: {e}") from None
    current: list[str] = []
    has_text = False
    for piece in pieces:
        for line in piece.splitlines(keepends=True):
            if rx.match(line) and has_text:
                yield iter(["".join(current)])
                current, has_text = [], False
            current.append(line)
            has_text = has_text or bool(line.strip())
    yield iter(["".join(current)])


def _raw_docs(path: str, text_field: str, errors: str) -> Iterator[Iterator[str]]:
    """Each document of `path` as an iterator of its pieces (plain text files stream; other
    formats are read a file at a time, as read_documents does)."""
    if path.startswith(HF_PREFIX):
        for doc in iter_hf_documents(path, text_field):
            yield iter([doc])
        return
    for f in resolve_files(path):
        if _stem_suffix(f) in TEXT_SUFFIXES:
            yield iter_text_pieces(f, errors)
        elif _stem_suffix(f) == ".jsonl":
            number = 0
            for piece in iter_text_pieces(f, errors):
                for line in piece.splitlines():
                    number += 1
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise UserError(f"{f}: line {number} is not valid JSON ({e.msg})") from None
                        yield iter([_field(record, text_field, f, f"line {number}", errors)])
        else:
            for doc in iter_documents(f, text_field, errors):
                yield iter([doc])


def iter_pieces(
    path: str | None,
    text_field: str = "text",
    errors: str = "strict",
    doc_pattern: str | None = None,
    key: str = "data.path",
) -> Iterator[tuple[str, bool]]:
    """The documents read_documents returns, streamed as (piece, ends_document): each piece but a
    document's last ends after a newline, and no whole document need be in memory (except with
    data.doc_pattern, one document at a time). An empty corpus is an error, as there."""
    if not path:
        raise UserError(f"{key} is not set (e.g. data=text {key}=FILE)")
    docs = _raw_docs(path, text_field, errors)
    seen = False
    for doc in docs:
        for sub in _pattern_docs(doc, doc_pattern) if doc_pattern else (doc,):
            held: list[str] = []  # leading whitespace-only pieces: the document may be empty
            last: str | None = None
            for piece in sub:
                if last is not None:
                    yield last, False
                    last = piece
                elif piece.strip():
                    for h in held:
                        yield h, False
                    held, last = [], piece
                else:
                    held.append(piece)
            if last is not None:
                seen = True
                yield last, True
    if not seen:
        raise UserError(f"data {path} is empty (no non-whitespace text)")
