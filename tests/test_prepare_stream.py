"""Bounded-memory preparation: the streamed split equals the in-memory one, shards read as one
array, a prepare killed mid-shard resumes to the same shards, peak memory does not grow with the
corpus, and `hf:` sources with data.streaming read the datasets stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llmtrain.config.schema import DataConfig
from llmtrain.data import prepare as prep, sources
from llmtrain.data.corpus import split_documents, split_point, split_tokens
from llmtrain.data.sources import iter_pieces, read_documents
from llmtrain.data.tokens import ShardedTokens
from llmtrain.tokenizers.byte import ByteTokenizer
from llmtrain.tokenizers.char import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
WIKI_DOCS = r"^ = [^=].* = $"
# Small pieces, tasks and shards, so a tiny corpus spans many of each.
SMALL = {"SHARD_TOKENS": 5000, "CHUNK_CHARS": 3000}


def _corpus(tmp_path: Path, n: int = 120) -> Path:
    """Articles with headings, unicode and long lines (no shared data needed)."""
    arts = [
        f" = Article {i} = \n\n" + "".join(f" line {j} of {i}: ünï 😀 {'x' * (j % 7) * 40} .\n" for j in range(25))
        for i in range(n)
    ]
    p = tmp_path / "corpus.txt"
    p.write_text("".join(arts), encoding="utf-8")
    return p


@pytest.fixture
def small(monkeypatch):
    for k, v in SMALL.items():
        monkeypatch.setattr(prep, k, v)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)


def _data(tmp_path, path, **kw) -> DataConfig:
    return replace(DataConfig(), path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_streamed_pieces_are_the_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    src = _corpus(tmp_path, 20)
    for pattern in (None, WIKI_DOCS):
        docs, cur = [], []
        for piece, ends in iter_pieces(str(src), doc_pattern=pattern):
            assert ends or piece.endswith("\n")  # only cut after newlines
            cur.append(piece)
            if ends:
                docs.append("".join(cur))
                cur = []
        assert docs == read_documents(str(src), doc_pattern=pattern)
    # Whitespace-only documents are dropped, and so is an all-whitespace corpus, as read_documents does.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("  \n\n")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "one"}\n{"text": "  "}\n{"text": "two"}\n')
    assert [p for p, _ in iter_pieces(str(tmp_path / "d"))] == ["one", "two"]
    (tmp_path / "d" / "b.jsonl").unlink()
    with pytest.raises(prep.UserError, match="empty"):
        list(iter_pieces(str(tmp_path / "d")))


def test_counting_on_bytes_equals_counting_decoded_text(tmp_path, monkeypatch):
    """Plain text files are counted on their bytes (sources.count_text_file); the plan is the one
    decoding every piece gives, on files that make the count hard, and the errors are the same."""
    d = tmp_path / "d"
    d.mkdir()
    files = {
        "a.txt": "ünï 😀 ∑ text\n" * 50,
        "b.txt": "\n\n   leading whitespace, then text\n",
        "c.txt": "  \n\t\n",  # whitespace only: no document
        "d.txt": "\u3000\u00a0\n\u2028",  # unicode whitespace only: no document either
        "e.txt": "\u3000 then text\r\nwith CRLF\r\n",
        "f.txt": "\ufeffa byte-order mark",
        "g.md": "x" * 5000,
    }
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(sources, "COUNT_BLOCK_BYTES", 7)  # blocks cut inside characters
    for frac, val in ((0.2, None), (0.0, str(d / "a.txt"))):
        data = _data(tmp_path, d, val_fraction=frac, val_path=val)
        prep._plans.clear()
        fast = prep.plan_split(data)
        with monkeypatch.context() as m:
            m.setattr(prep, "plain_text_counts", lambda *a: None)
            prep._plans.clear()
            slow = prep.plan_split(data)
        assert fast == slow
        assert fast.n_docs == 5 + (val is not None)
    (d / "h.txt").write_bytes(b"text\n\x00binary")
    prep._plans.clear()
    with pytest.raises(prep.UserError, match="NUL byte at offset 5"):
        prep.plan_split(_data(tmp_path, d))


def test_csv_and_parquet_stream_the_same_documents(tmp_path, monkeypatch):
    """CSV/TSV rows and Parquet values are read a piece at a time (the whole file is never read),
    and they are the documents a whole-file read gives: quoted fields across lines and blocks,
    CRLF, a unicode line separator."""
    import csv
    import io

    rows = [{"text": f"row {i} ünï\nsecond line {'x' * (i % 13)}\u2028end", "label": str(i % 2)} for i in range(300)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["text", "label"], lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    (tmp_path / "d.csv").write_text(buf.getvalue(), encoding="utf-8", newline="")
    whole = [r["text"] or "" for r in csv.DictReader(buf.getvalue().splitlines())]  # how it was read
    monkeypatch.setattr(sources, "BLOCK_BYTES", 97)  # blocks end inside rows, fields and characters
    monkeypatch.setattr(sources, "read_text", lambda *a, **k: pytest.fail("read whole"))
    assert list(sources.iter_documents(tmp_path / "d.csv")) == whole
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["text"] for r in rows], "n": list(range(300))}), tmp_path / "d.parquet")
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 7)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read whole"))
    assert list(sources.iter_documents(tmp_path / "d.parquet")) == [r["text"] for r in rows]
    with pytest.raises(prep.UserError, match="no column 'body'"):
        list(sources.iter_documents(tmp_path / "d.parquet", text_field="body"))


def test_split_point_matches_split_documents():
    rng = np.random.default_rng(0)
    for _ in range(200):
        docs = ["x" * int(n) for n in rng.integers(1, 300, size=int(rng.integers(1, 6)))]
        frac = float(rng.choice([0.0, 0.05, 0.1, 0.5, 0.9]))
        ds = split_documents(docs, frac)
        k, offset, by = split_point([len(d) for d in docs], frac)
        assert (len(ds.train) - int(offset > 0), ds.cut_inside, ds.by) == (k, offset > 0, by)
        if offset:
            assert len(ds.train[-1]) == offset


@pytest.mark.parametrize(
    "pattern,frac,mode",
    [(WIKI_DOCS, 0.1, "lines"), (None, 0.1, "whole"), (None, 0.3, "lines"), (WIKI_DOCS, 0.0, "whole")],
)
def test_streamed_shards_equal_in_memory_split(tmp_path, small, monkeypatch, pattern, frac, mode):
    """Many shards, tasks and pieces; a document cut by the split; the "whole" mode that never cuts
    a document: the tokens are those of split_tokens."""
    src = _corpus(tmp_path, 50)
    data = _data(tmp_path, src, doc_pattern=pattern, val_fraction=frac)
    docs = read_documents(str(src), doc_pattern=pattern)
    tok = CharTokenizer.train(docs)
    monkeypatch.setattr(prep, "encode_mode", lambda t: mode)
    p = prep.prepare(data, tok, verbose=False)
    got, ref = p.splits(), split_tokens(docs, tok, frac)
    assert len(p.meta["train"]["shards"]) > 3
    assert all(s["tokens"] == prep.SHARD_TOKENS for s in p.meta["train"]["shards"][:-1])
    assert isinstance(got.train, ShardedTokens)
    assert np.array_equal(got.train[:], ref.train) and np.array_equal(np.asarray(got.val), ref.val)
    assert (got.n_docs, got.val_bytes, got.by) == (ref.n_docs, ref.val_bytes, ref.by)


def test_sharded_tokens_slice_like_one_array():
    rng = np.random.default_rng(1)
    whole = rng.integers(0, 1000, size=1000).astype(np.uint16)
    cuts = [0, 7, 300, 301, 650, 1000]
    st = ShardedTokens([whole[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    assert len(st) == 1000 and st.dtype == np.uint16
    for a, b in [(0, 1000), (5, 9), (299, 302), (300, 301), (640, 990), (990, 2000), (-10, None), (400, 400)]:
        assert np.array_equal(st[a:b], whole[a:b]), (a, b)
    assert st[650] == whole[650] and st[-1] == whole[-1]
    from llmtrain.data.loader import PackedWindows

    a, b = PackedWindows(st, 16, 4, seed=0), PackedWindows(whole, 16, 4, seed=0)
    assert a.tokens is st  # read window by window, never copied whole
    assert all(np.array_equal(a.batch(s)["input_ids"], b.batch(s)["input_ids"]) for s in range(20))


KILLED = """
import os, signal, sys
from dataclasses import replace
from llmtrain.config.schema import DataConfig
from llmtrain.data import prepare as P, sources
from llmtrain.files import tmp_name
from llmtrain.tokenizers.byte import ByteTokenizer
P.SHARD_TOKENS, P.CHUNK_CHARS, sources.BLOCK_BYTES = {shard}, {chunk}, 4096
publish, n = P.atomic_replace, [0]
def dying_publish(tmp, path):  # the 3rd shard: half of it on disk, then kill -9
    n[0] += 1
    if n[0] == 3:
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, path)
P.atomic_replace = dying_publish
path, cache, pattern, num_proc = sys.argv[1:]
data = replace(DataConfig(), path=path, cache_dir=cache, doc_pattern=pattern, num_proc=int(num_proc))
P.prepare(data, ByteTokenizer())
"""


@pytest.mark.parametrize("num_proc", [1, 2])
def test_prepare_killed_mid_shard_resumes_to_the_same_shards(tmp_path, small, num_proc):
    """num_proc=2: the killed run also leaves the directory of its workers' task and token files,
    in the entry's work directory (not /tmp); the resumed run removes it."""
    src = _corpus(tmp_path)
    script = KILLED.format(shard=prep.SHARD_TOKENS, chunk=prep.CHUNK_CHARS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(src), str(cache), WIKI_DOCS, str(num_proc)],
        env=env,
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    data = _data(tmp_path, src, doc_pattern=WIKI_DOCS)
    tok = ByteTokenizer()
    key = prep.entry_key(data, tok)
    work = cache / "prepared" / f".{key}.partial"
    manifest = json.loads((work / prep.MANIFEST).read_text())
    assert len(manifest["shards"]["train"]) == 2 and manifest["resume"]["skip"] > 0  # stopped mid-task
    assert list(work.glob("*.tmp-*"))  # the half-written shard
    assert len([p for p in work.glob(".encoded.tmp-*") if p.is_dir()]) == (num_proc > 1)  # the workers' files
    assert not (cache / "prepared" / key).exists()
    resumed = prep.prepare(data, tok, verbose=False)
    fresh = prep.prepare(replace(data, cache_dir=str(tmp_path / "fresh")), tok, verbose=False)
    names = sorted(f.name for f in fresh.dir.glob("*.bin"))
    assert len(names) > 4 and sorted(f.name for f in resumed.dir.glob("*.bin")) == names
    for name in names:
        assert (resumed.dir / name).read_bytes() == (fresh.dir / name).read_bytes(), name
    for k in ("train", "val", "documents"):
        assert resumed.meta[k] == fresh.meta[k]
    assert not work.exists() and not list(resumed.dir.glob(".*"))


PEAK = """
import sys
from dataclasses import replace
from llmtrain.config.schema import DataConfig
from llmtrain.data import prepare as P, sources
from llmtrain.tokenizers.byte import ByteTokenizer
# Scaled down with the corpus: blocks, tasks and shards much smaller than either corpus.
P.SHARD_TOKENS, P.CHUNK_CHARS, sources.BLOCK_BYTES = 1 << 18, 1 << 16, 1 << 16
tok = ByteTokenizer()
path, cache, pattern, num_proc, warm = sys.argv[1:]
data = replace(DataConfig(), path=path, cache_dir=cache, doc_pattern=pattern, num_proc=int(num_proc))
P.prepare(replace(data, path=warm), tok, verbose=False)  # imports and first-use costs
def rss(field):  # kB in /proc/self/status
    line = next(x for x in open("/proc/self/status") if x.startswith(field))
    return int(line.split()[1]) * 1024
before = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := the current RSS
meta = P.prepare(data, tok, verbose=False).meta
print(rss("VmHWM") - before, meta["train"]["tokens"] + meta["val"]["tokens"])
"""

PEAK_BOUND = 10 << 20  # bytes of peak RSS a prepare may add over the process it starts in


def test_peak_memory_is_the_same_bound_at_two_corpus_sizes(tmp_path):
    """A corpus 7x larger (its text bigger than the bound, its tokens twice that) stays under the
    same bound: memory does not grow with the corpus."""
    base = _corpus(tmp_path, 500).read_text()
    (tmp_path / "warm").mkdir()
    warm = _corpus(tmp_path / "warm", 5)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    grown = []
    for i, repeat in enumerate((1, 7)):
        src = tmp_path / f"c{i}.txt"
        src.write_text(base * repeat, encoding="utf-8")
        out = subprocess.run(
            [sys.executable, "-c", PEAK, str(src), str(tmp_path / f"cache{i}"), WIKI_DOCS, "1", str(warm)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        extra, n_tokens = map(int, out.stdout.split())
        grown.append((extra, n_tokens, src.stat().st_size))
    (small_rss, _, small_bytes), (big_rss, big_tokens, big_bytes) = grown
    assert big_bytes > PEAK_BOUND and 2 * big_tokens > 2 * PEAK_BOUND > small_bytes  # held whole, either would not fit
    assert small_rss < PEAK_BOUND and big_rss < PEAK_BOUND, grown


def test_streaming_hf_local_files_tokenizes_on_the_fly_and_resumes(tmp_path, monkeypatch):
    """data.streaming=true over hf:DIR (the datasets streaming mode on local files): windows are
    the documents' tokens in order, epoch after epoch; a loader started at a step (a resume)
    gives the batches of one that ran there; ranks read disjoint windows; nothing is prepared."""
    import torch

    from llmtrain.config.schema import RunConfig
    from llmtrain.data.corpus import tokenize_documents
    from llmtrain.data.pipeline import load_corpus
    from llmtrain.data.streaming import StreamWindows, TokenStream
    from llmtrain.objectives import build_objective

    seen = []
    import datasets

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: seen.append(k.get("streaming")) or real(*a, **k))
    d = tmp_path / "hfdata"
    d.mkdir()
    rows = [{"text": f"doc {i}: " + "wörds and more " * (i % 5 + 1)} for i in range(30)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.txt").write_text("more words and doc\n")
    cfg = RunConfig()
    cfg.stage = "pretrain"
    cfg.data = _data(tmp_path, f"hf:{d}", streaming=True, seq_len=16, batch_size=3, val_path=str(tmp_path / "val.txt"))
    tok, splits = load_corpus(cfg)
    assert isinstance(splits.train, TokenStream) and seen and all(seen)  # streamed, never loaded whole
    assert not (tmp_path / "cache" / "prepared").exists()
    assert tok.decode(splits.val.tolist()).startswith("more words and doc")
    epoch = np.concatenate(tokenize_documents([r["text"] for r in rows], tok))
    stream = np.concatenate([epoch] * 3)
    T, B = 16, 3
    src = build_objective(cfg.objective, tok, splits, cfg.data, 0).train_source()
    assert isinstance(src, StreamWindows)
    steps = len(epoch) // (T * B) + 3  # past the end of the first epoch
    batches = [src.batch(s) for s in range(steps)]
    for s, b in enumerate(batches):
        want = np.stack([stream[g * T : g * T + T + 1] for g in range(s * B, s * B + B)])
        assert np.array_equal(b["input_ids"].numpy(), want[:, :-1]) and np.array_equal(b["labels"].numpy(), want[:, 1:])
    resumed = StreamWindows(splits.train, T, B)
    assert torch.equal(resumed.batch(steps - 2)["input_ids"], batches[steps - 2]["input_ids"])
    r0, r1 = (StreamWindows(splits.train, T, B, rank=r, world_size=2) for r in range(2))
    assert torch.equal(r0.batch(1)["input_ids"], batches[2]["input_ids"])
    assert torch.equal(r1.batch(1)["input_ids"], batches[3]["input_ids"])


def test_tokenizer_sample_is_the_training_split_or_a_bounded_spread_of_it(tmp_path, monkeypatch):
    src = _corpus(tmp_path, 60)
    data = _data(tmp_path, src, doc_pattern=WIKI_DOCS)
    docs = read_documents(str(src), doc_pattern=WIKI_DOCS)
    assert prep.tokenizer_sample(data) == split_documents(docs, 0.1).train  # small: all of it, as before
    monkeypatch.setattr(prep, "TOKENIZER_SAMPLE_CHARS", 20_000)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 2000)
    prep._plans.clear()
    sample = prep.tokenizer_sample(replace(data, val_fraction=0.2))
    assert 10_000 < sum(map(len, sample)) <= 20_000 + 2 * 4000
    train = split_documents(docs, 0.2).train
    assert sample[0] == train[0] and any(s == d for s in sample[-4:] for d in train[-8:])  # spread to the end
