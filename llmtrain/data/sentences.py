"""Sentences and sentence pairs, for sentence embeddings (objective=contrastive, `llmtrain embed`,
evaluate's sts task).

- `read_sentences`: one sentence per line of a text file, or per record of a .jsonl/.json/.csv/
  .tsv/.parquet file (its data.text_field).
- `read_pairs`: (sentence A, sentence B, score) rows. `columns` name them: digits are 1-based
  columns of a headerless .tsv/.csv (STS-B's dev.tsv: 8, 9, 10), other names are fields of a
  header row or of JSON records. Without a score column every pair scores 1.0.

Every problem is a UserError naming the file and the line or record.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from llmtrain.data.sources import TEXT_SUFFIXES, iter_documents, read_text
from llmtrain.errors import UserError


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def _file(path: str | None, what: str) -> Path:
    if not path:
        raise UserError(f"{what} is not set (a file of sentences)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: file not found: {path}")
    return p


def read_sentences(
    path: str | None, text_field: str = "text", errors: str = "strict", *, keep_empty: bool = False, what: str = ""
) -> list[str]:
    """The sentences of `path`, in order: each line of a text file, each record otherwise.
    keep_empty=True keeps blank lines (so `embed` writes one row per line); an empty file is an error."""
    what = what or "data.path"
    p = _file(path, what)
    if _kind(p) in TEXT_SUFFIXES or _kind(p) not in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        items = read_text(p, errors).splitlines()
    else:
        items = list(iter_documents(p, text_field, errors))
    out = [s.strip() for s in items]
    if not keep_empty:
        out = [s for s in out if s]
    if not any(out):
        raise UserError(f"{p}: no sentences (one per line, or per record with field {text_field!r})")
    return out


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    score: float
    line: int  # the line (delimited, JSONL) or record (JSON) it came from


def _score(value: object, p: Path, where: str, column: str) -> float:
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{p}: {where}: score column {column} is {str(value)[:40]!r}, not a number") from None
    if score != score:  # NaN
        raise UserError(f"{p}: {where}: score column {column} is NaN")
    return score


def read_pairs(path: str | None, columns: list[str], what: str, errors: str = "strict") -> list[Pair]:
    """The sentence pairs of `path` (columns: A, B[, score]; see the module docstring)."""
    columns = [str(c) for c in columns]
    if len(columns) not in (2, 3):
        raise UserError(f"{what}: expected 2 or 3 columns (sentence A, sentence B[, score]), got {columns}")
    p = _file(path, what)
    kind = _kind(p)
    numbered = all(c.isdigit() for c in columns)
    if numbered and any(int(c) < 1 for c in columns):
        raise UserError(f"{what}: column numbers are 1-based, got {columns}")
    text = read_text(p, errors)
    rows: list[tuple[int, dict | list]] = []
    if kind in (".tsv", ".csv"):
        delim = "\t" if kind == ".tsv" else ","
        quoting = csv.QUOTE_NONE if kind == ".tsv" else csv.QUOTE_MINIMAL
        lines = text.splitlines()
        if numbered:
            rows = [(i, r) for i, r in enumerate(csv.reader(lines, delimiter=delim, quoting=quoting), 1) if r]
        else:
            reader = csv.DictReader(lines, delimiter=delim, quoting=quoting)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{p}: no column {missing[0]!r} in the header row (columns: {columns})")
            rows = [(i, r) for i, r in enumerate(reader, 2)]
    elif kind in (".jsonl", ".json") and not numbered:
        try:
            if kind == ".json":
                data = json.loads(text)
                rows = list(enumerate(data if isinstance(data, list) else [], 1))
            else:
                rows = [(i, json.loads(ln)) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
    else:
        need = "a headerless .tsv/.csv" if numbered else "a .tsv/.csv with a header row, .jsonl or .json"
        raise UserError(f"{p}: columns {columns} need {need}")
    pairs = []
    for n, row in rows:
        where = f"line {n}" if kind != ".json" else f"record {n}"
        if numbered:
            idx = [int(c) - 1 for c in columns]
            if len(row) <= max(idx):
                need = max(idx) + 1
                raise UserError(f"{p}: {where} has {len(row)} columns, needs column {need} (columns: {columns})")
            values = [row[i] for i in idx]
        else:
            if not isinstance(row, dict):
                raise UserError(f"{p}: {where} is not a record with fields {columns}")
            absent = [c for c in columns if row.get(c) is None]
            if absent:
                raise UserError(f"{p}: {where} has no field {absent[0]!r} (columns: {columns})")
            values = [row[c] for c in columns]
        if not all(isinstance(v, str) for v in values[:2]):
            raise UserError(f"{p}: {where}: the sentences must be text")
        score = _score(values[2], p, where, columns[2]) if len(values) == 3 else 1.0
        pairs.append(Pair(values[0].strip(), values[1].strip(), score, n))
    if not pairs:
        raise UserError(f"{p}: no sentence pairs")
    return pairs
