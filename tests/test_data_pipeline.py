"""Data pipeline: prepared token shards (cache, reuse, invalidation), loaders over memmaps,
`tokenizer train`, `data prepare`, the sentencepiece default path, and bad input.

Every test writes only under tmp_path (data.cache_dir / LLMTRAIN_CACHE_DIR point there).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED, TINY, assert_user_error, run_cli
from llmtrain.config.schema import DataConfig, RunConfig, TokenizerConfig
from llmtrain.data import prepare as prep
from llmtrain.data.corpus import split_documents, split_tokens
from llmtrain.data.loader import PackedWindows, sequential_windows
from llmtrain.data.pipeline import load_corpus, run_tokenizer
from llmtrain.data.sources import read_documents
from llmtrain.errors import UserError
from llmtrain.tokenizers.char import CharTokenizer
from llmtrain.tokenizers.train import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "llmtrain" / "assets" / "tinyshakespeare.txt.gz"
WIKI = SHARED / "wikitext2" / "valid.txt"
WIKI_DOCS = r"^ = [^=].* = $"


def _wiki_small(tmp_path: Path) -> Path:
    """The first ~200 KB of WikiText-2 valid (several articles): fast to tokenize."""
    text = (
        WIKI.read_text(encoding="utf-8")[:200_000]
        if WIKI.exists()
        else ("".join(f" = Title {i} = \n\n word {i} and more words here .\n" * 40 for i in range(30)))
    )
    p = tmp_path / "wiki.txt"
    p.write_text(text, encoding="utf-8")
    return p


def _data(tmp_path: Path, path: Path, **kw) -> DataConfig:
    return replace(DataConfig(), path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    docs = read_documents(str(_wiki_small(tmp)), doc_pattern=WIKI_DOCS)
    return train_sentencepiece(docs, TokenizerConfig(name="sentencepiece", vocab_size=500), tmp / "sp.model")


def _same_splits(a, b) -> None:
    assert np.array_equal(np.asarray(a.train), np.asarray(b.train))
    assert np.array_equal(np.asarray(a.val), np.asarray(b.val))
    assert (a.n_docs, a.val_bytes) == (b.n_docs, b.val_bytes)


# -- prepared shards equal the in-memory split -----------------------------------------------


def test_single_document_char_split_unchanged(tmp_path):
    """Shakespeare stays nanoGPT's 90/10 character split, now read back from uint16 memmaps."""
    data = _data(tmp_path, SHAKESPEARE)
    docs = read_documents(data.path)
    tok = CharTokenizer.train(docs)
    p = prep.prepare(data, tok, verbose=False)
    splits = p.splits()
    assert isinstance(splits.train, np.memmap) and splits.train.dtype == np.uint16
    _same_splits(splits, split_tokens(docs, tok, 0.1))
    # Independent of our code: the text itself, cut at 90% of (characters + eos).
    text = gzip.decompress(SHAKESPEARE.read_bytes()).decode()
    cut = int((len(text) + 1) * 0.9)
    assert tok.decode(splits.train.tolist()) == text[:cut]
    assert p.meta["dtype"] == "uint16" and p.meta["train"]["tokens"] == cut


@pytest.mark.parametrize("num_proc,bounded", [(1, False), (2, False), (2, True)])
def test_parallel_chunked_sentencepiece_equals_whole_encoding(tmp_path, sp, monkeypatch, num_proc, bounded):
    """Documents cut at newlines and tokenized in worker processes give the same ids as encoding
    each document whole (the reference), split where split_documents puts the cut. bounded: as
    for a large source (the malloc bound, with its heap trims every few tasks)."""
    monkeypatch.setattr(prep, "CHUNK_CHARS", 2000)  # many pieces per document
    monkeypatch.setattr(prep, "HEAP_TRIM", {"every": 0, "count": 0, "ceiling": 0})
    if bounded:
        monkeypatch.setattr(prep, "BOUND_MALLOC_BYTES", 0)
    data = _data(tmp_path, _wiki_small(tmp_path), doc_pattern=WIKI_DOCS, num_proc=num_proc)
    docs = read_documents(data.path, doc_pattern=WIKI_DOCS)
    assert len(docs) > 3 and max(map(len, docs)) > 3 * 2000
    splits = prep.prepare(data, sp, verbose=False).splits()
    ds = split_documents(docs, 0.1)
    assert "".join(ds.train + ds.val) == "".join(docs)

    def ref(parts, open_end):  # each part encoded whole; eos unless it continues past the cut
        last = len(parts) - 1
        return np.concatenate(
            [sp.sp.encode(d) + ([] if open_end and i == last else [sp.eos_id]) for i, d in enumerate(parts)]
        )

    assert np.array_equal(splits.train, ref(ds.train, ds.cut_inside))
    assert np.array_equal(splits.val, ref(ds.val, False))
    assert splits.val_bytes == sum(len(d.encode()) for d in ds.val)
    # the heap is trimmed (every few encoded tasks) only under the bound
    assert (prep.HEAP_TRIM["every"] > 0) == bounded and (prep.HEAP_TRIM["count"] > 0) == bounded


def test_a_task_handed_to_a_worker_goes_through_a_file_that_one_process_claims(tmp_path, sp, monkeypatch):
    """A worker's task is its text in a file plus its piece lengths: the worker's ids equal the
    main process's, on text with characters of every UTF-8 length. Whoever claims the file first
    encodes the task: taken back by the main process, the worker skips it (None), and once a
    worker has it, it cannot be taken back."""
    monkeypatch.setattr(prep, "_worker_tok", sp)
    pieces = [("naïve café — 東京 😀 tokens\n  spaced  out\n", True), ("", True), ("a piece that goes on", False)]
    task = ("train", "words", pieces)
    job = prep._task_file(task, str(tmp_path))
    with open(job[0], "rb") as f:
        assert f.read().decode("utf-8") == "".join(p for p, _ in pieces)
    out = prep._worker_encode(job, str(tmp_path))
    assert out is not None and not os.path.exists(job[0])
    assert np.array_equal(prep._collect(out), prep.encode_task(task, sp))
    assert not prep._take_back(job[0])  # the worker had it
    job = prep._task_file(task, str(tmp_path))
    assert prep._take_back(job[0])
    assert prep._worker_encode(job, str(tmp_path)) is None and not prep._take_back(job[0])
    assert os.listdir(tmp_path) == []  # nothing left behind
    # a lone surrogate (no source yields one, but the file must not be where a str breaks)
    job = prep._task_file(("val", "words", [("\udcff", True)]), str(tmp_path))
    with open(job[0], "rb") as f:
        assert f.read().decode("utf-8", "surrogatepass") == "\udcff"


def test_the_main_process_takes_back_the_queued_tail_and_the_ids_stay_in_order(tmp_path, sp, monkeypatch):
    """Every task goes to the worker's queue (no limit on it), so at the end of the stream the main
    process takes back the ones the worker has not started: the output is the serial one, task by
    task, whoever encoded each."""
    monkeypatch.setattr(prep, "WORKER_QUEUE", 10_000)
    monkeypatch.setattr(prep, "IN_FLIGHT", 10_000)
    taken = []
    take_back = prep._take_back

    def counted(path):
        if took := take_back(path):
            taken.append(path)
        return took

    monkeypatch.setattr(prep, "_take_back", counted)
    text = WIKI.read_text(encoding="utf-8")[:400_000] if WIKI.exists() else "some words and more words\n" * 20_000
    tasks = [("train", "words", [(text[i : i + 2000], i % 6000 == 0)]) for i in range(0, len(text), 2000)]
    serial = list(prep._encoded(iter(tasks), sp, 1, True, tmp_path))
    parallel = list(prep._encoded(iter(tasks), sp, 2, True, tmp_path))
    assert len(parallel) == len(serial) == len(tasks)
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))
    # 200 tasks queued in a few ms: the worker (a fork, then one task at a time) cannot have
    # started the last ones by then
    assert 0 < len(taken) < len(tasks)


def test_heap_is_trimmed_every_few_tasks_and_whenever_rss_passes_the_ceiling(monkeypatch):
    """Under the malloc bound a process trims every TRIM_EVERY tasks; its first trim sets the
    ceiling (its RSS then + TRIM_HEADROOM), and from then on any task that starts above it trims
    too, so the peak does not creep up with the corpus between the periodic trims."""
    rss = [500 << 20]
    trims: list[int] = []
    monkeypatch.setattr(prep, "HEAP_TRIM", {"every": 4, "count": 0, "ceiling": 0})
    monkeypatch.setattr(prep, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(prep, "malloc_trim", lambda: trims.append(prep.HEAP_TRIM["count"]))
    for _ in range(3):  # no ceiling yet: however high RSS is, only the periodic trim
        prep._trim_heap()
    assert trims == []
    rss[0] = 100 << 20
    prep._trim_heap()
    assert trims == [4] and prep.HEAP_TRIM["ceiling"] == (100 << 20) + prep.TRIM_HEADROOM
    rss[0] = prep.HEAP_TRIM["ceiling"]  # at the ceiling: not above it
    prep._trim_heap()
    rss[0] += 1
    prep._trim_heap()
    rss[0] = 120 << 20
    prep._trim_heap()
    prep._trim_heap()  # the 8th call: periodic again
    assert trims == [4, 6, 8]
    assert prep.HEAP_TRIM["ceiling"] == (100 << 20) + prep.TRIM_HEADROOM  # set once, by the first trim


def test_word_cache_encoding_is_exact(sp, tmp_path):
    """Our BPE models encode each distinct space-led word once; the ids must equal encoding the
    text whole with the raw sentencepiece processor, on awkward text and a real corpus."""
    from llmtrain.data.corpus import encode_mode, encode_texts

    assert encode_mode(sp) == "words" and encode_mode(CharTokenizer("ab")) == "lines"
    unigram = train_sentencepiece(
        read_documents(str(_wiki_small(tmp_path)))[:1],
        TokenizerConfig(name="sentencepiece", vocab_size=500, model_type="unigram"),
        tmp_path / "uni.model",
    )
    assert encode_mode(unigram) == "lines"
    texts = [
        "",
        " ",
        "   ",
        "a",
        "  two  spaces  ",
        "tab\there \t x",
        " lead",
        "trail \n\n  \n",
        "日本語 😀 ünïcödé",
        "12345 678.9",
        "[CLS] x [SEP][MASK]",
        "a\r\nb\x0c c",
        "end   ",
    ]
    text = gzip.decompress(SHAKESPEARE.read_bytes()).decode()
    texts += [text[:300_000], _wiki_small(tmp_path).read_text()]
    got = encode_texts(sp, texts, "words")
    for t, ids in zip(texts, got):
        assert ids.tolist() == sp.sp.encode(t), t[:40]


def test_uint32_for_large_vocab(tmp_path):
    data = _data(tmp_path, SHAKESPEARE)
    tok = CharTokenizer.train(read_documents(data.path))
    tok.vocab_size = 70_000  # dtype follows the vocabulary size
    p = prep.prepare(data, tok, verbose=False)
    assert p.meta["dtype"] == "uint32" and p.splits().train.dtype == np.uint32
    assert os.path.getsize(p.dir / "train-00000.bin") == 4 * p.meta["train"]["tokens"]


# -- cache: reuse, invalidation, atomicity ---------------------------------------------------


def _entries(tmp_path: Path) -> list[str]:
    d = tmp_path / "cache" / "prepared"
    return sorted(x.name for x in d.iterdir()) if d.exists() else []


def test_reuse_and_invalidation(tmp_path, sp):
    src = _wiki_small(tmp_path)
    data = _data(tmp_path, src, doc_pattern=WIKI_DOCS)
    tok = CharTokenizer.train(read_documents(data.path))
    first = prep.prepare(data, tok, verbose=False)
    assert not first.reused
    calls = []
    again = prep.prepare(data, tok, split=lambda: calls.append(1) or [], verbose=False)
    assert again.reused and again.dir == first.dir and not calls  # nothing read again
    # Another tokenizer: another entry, its own tokens (never mixed with the first).
    other = prep.prepare(data, sp, verbose=False)
    assert other.dir != first.dir and not other.reused
    assert np.array_equal(
        other.splits().train[:50], sp.encode(read_documents(data.path, doc_pattern=WIKI_DOCS)[0])[:50]
    )
    # Changed source (same size, new content): detected by the hash, prepared anew.
    text = src.read_text()
    src.write_text(text.replace("the", "teh"))
    changed = prep.prepare(data, tok, verbose=False)
    assert changed.dir != first.dir and not changed.reused
    # Another split setting: another entry.
    assert prep.prepare(replace(data, val_fraction=0.2), tok, verbose=False).dir not in (first.dir, changed.dir)
    assert not [n for n in _entries(tmp_path) if ".tmp-" in n]


def test_interrupted_prepare_leaves_no_entry_and_is_finished(tmp_path, monkeypatch):
    data = _data(tmp_path, SHAKESPEARE)
    tok = CharTokenizer.train(read_documents(data.path))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "encode_task", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(data, tok, verbose=False)
    key = prep.entry_key(data, tok)
    assert _entries(tmp_path) == [f".{key}.partial"]  # no entry: only the work to resume
    monkeypatch.undo()
    assert not prep.prepare(data, tok, verbose=False).reused
    shutil.rmtree(tmp_path / "cache" / "prepared" / key)
    # An entry directory without meta.json (e.g. copied half-way) is never used.
    entry = tmp_path / "cache" / "prepared" / prep.entry_key(data, tok)
    entry.mkdir(parents=True)
    (entry / "train.bin").write_bytes(b"\0\0" * 100)
    p = prep.prepare(data, tok, verbose=False)
    assert not p.reused and p.dir == entry and len(p.splits().train) > 1000


def test_cache_dir_holding_other_tokenizers_shards_is_an_error(tmp_path, sp):
    data = _data(tmp_path, SHAKESPEARE)
    char = CharTokenizer.train(read_documents(data.path))
    entry = prep.prepare(data, char, verbose=False).dir
    pinned = replace(data, cache_dir=str(entry))  # the user points at the entry itself
    assert prep.prepare(pinned, char, verbose=False).reused
    with pytest.raises(UserError, match="another tokenizer"):
        prep.prepare(pinned, sp, verbose=False)


# -- loaders ---------------------------------------------------------------------------------


def _memmap(tmp_path: Path, n: int) -> np.memmap:
    arr = np.arange(n, dtype=np.uint32)  # token value == position: a row names its window
    arr.tofile(tmp_path / "t.bin")
    return np.memmap(tmp_path / "t.bin", dtype=np.uint32, mode="r")


def test_packed_windows_disjoint_across_ranks_and_cover_epoch(tmp_path):
    T, B = 16, 4
    tokens = _memmap(tmp_path, 16 * 200 + 5)
    ranks = [PackedWindows(tokens, T, B, seed=3, rank=r, world_size=2) for r in range(2)]
    n = ranks[0].n_windows
    steps = n // (2 * B)
    seen = []
    for step in range(steps):
        starts = []
        for w in ranks:
            b = w.batch(step)
            x, y = b["input_ids"], b["labels"]
            assert x.dtype == torch.int64 and x.shape == (B, T)
            # Consecutive positions: inputs and labels are one window shifted by one.
            assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
            starts.append(set(x[:, 0].tolist()))
        assert not starts[0] & starts[1]  # ranks never share a window at the same step
        seen += [s for st in starts for s in st]
    assert len(seen) == len(set(seen)) == steps * 2 * B  # each window read once in the epoch
    offsets = {s % T for s in seen}
    assert len(offsets) == 1  # one epoch = one tiling of the stream
    # A pure function of (seed, step, rank): a fresh loader gives the same batch.
    again = PackedWindows(tokens, T, B, seed=3, rank=1, world_size=2)
    assert torch.equal(again.batch(5)["input_ids"], ranks[1].batch(5)["input_ids"])
    assert not torch.equal(
        PackedWindows(tokens, T, B, seed=4).batch(5)["input_ids"],
        PackedWindows(tokens, T, B, seed=3).batch(5)["input_ids"],
    )


def test_packed_windows_memmap_equals_array_and_stays_mapped(tmp_path):
    tokens = _memmap(tmp_path, 5000)
    mm = PackedWindows(tokens, 32, 8, seed=0)
    ref = PackedWindows(np.array(tokens, dtype=np.int64), 32, 8, seed=0)
    assert isinstance(mm.tokens, np.memmap)  # not copied into a tensor of the whole corpus
    for step in (0, 7, 100):
        assert torch.equal(mm.batch(step)["input_ids"], ref.batch(step)["input_ids"])


def test_sequential_windows_score_every_token_once(tmp_path):
    tokens = _memmap(tmp_path, 1000)
    labels = []
    for rank in range(2):
        for b in sequential_windows(tokens, 64, 3, rank=rank, world_size=2):
            labels += b["labels"][b["labels"] != -100].tolist()
    assert sorted(labels) == list(range(1, 1000))


# -- stages through the CLI ------------------------------------------------------------------


def test_pretrain_trains_sentencepiece_once_then_reuses(tmp_path):
    src, cache = _wiki_small(tmp_path), tmp_path / "cache"
    args = [
        "pretrain",
        *TINY,
        "data=text",
        f"data.path={src}",
        "tokenizer=sentencepiece",
        "tokenizer.vocab_size=400",
        "trainer.max_steps=2",
        "trainer.eval_batches=1",
        f"data.cache_dir={cache}",
    ]
    first = run_cli(*args, f"hydra.run.dir={tmp_path / 'r1'}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "training sentencepiece tokenizer" in first.stdout and "prepared " in first.stdout
    models = list((cache / "tokenizers").glob("*.model"))
    assert len(models) == 1 and models[0].with_suffix(".json").exists()
    mtime = models[0].stat().st_mtime_ns
    second = run_cli(*args, f"hydra.run.dir={tmp_path / 'r2'}")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "training sentencepiece" not in second.stdout
    assert f"using sentencepiece tokenizer {models[0]}" in second.stdout and "using prepared data" in second.stdout
    assert models[0].stat().st_mtime_ns == mtime
    # Other tokenizer settings: a new model next to the cached one, not the cached one.
    cfg = _cfg(tmp_path, src, name="sentencepiece", vocab_size=400, model_type="unigram")
    unigram = run_tokenizer(cfg, lambda: read_documents(str(src)))
    assert unigram.path != str(models[0]) and len(list((cache / "tokenizers").glob("*.model"))) == 2


def test_tokenizer_train_and_data_prepare_cli(tmp_path):
    src = _wiki_small(tmp_path)
    out = tmp_path / "tok"
    proc = run_cli(
        "tokenizer",
        "train",
        "data=text",
        f"data.path={src}",
        "tokenizer=sentencepiece",
        "tokenizer.vocab_size=500",
        "tokenizer.model_type=unigram",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["settings"]["model_type"] == "unigram" and meta["stats"]["vocab_size"] == 500
    cache = tmp_path / "cache"
    prep_args = [
        "data",
        "prepare",
        "data=text",
        f"data.path={src}",
        "tokenizer=sentencepiece",
        f"tokenizer.path={out / 'tokenizer.model'}",
        f"data.cache_dir={cache}",
        "data.num_proc=2",
        f"hydra.run.dir={tmp_path / 'p'}",
    ]
    proc = run_cli(*prep_args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (entry,) = (cache / "prepared").iterdir()
    m = json.loads((entry / "meta.json").read_text())
    from llmtrain.tokenizers.sentencepiece import SentencePieceTokenizer

    tok = SentencePieceTokenizer.load(out / "tokenizer.model")
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint()
    # Reference: the raw sentencepiece processor, line by line (a unigram model may break exact
    # score ties differently on one long input; every llmtrain stage encodes line by line).
    lines = src.read_text().split("\n")
    whole = [i for k, line in enumerate(lines) for i in tok.sp.encode(line + "\n" if k < len(lines) - 1 else line)] + [
        tok.eos_id
    ]
    train = np.fromfile(entry / "train-00000.bin", dtype=np.uint16)
    val = np.fromfile(entry / "val-00000.bin", dtype=np.uint16)
    assert np.array_equal(np.concatenate([train, val]), whole)
    # The split is by characters (one document: 90% of characters + eos), decided before tokenizing.
    text = src.read_text()
    assert tok.decode(train.tolist()) == text[: int((len(text) + 1) * 0.9)]
    cfg = _cfg(tmp_path, src, name="sentencepiece", path=str(out / "tokenizer.model"))
    again = prep.prepare(cfg.data, tok, verbose=False)
    assert again.reused and again.dir == entry  # the CLI's entry is found and reused
    # Pointing data.cache_dir at those shards while using another tokenizer: refused, not mixed.
    proc = run_cli(
        "pretrain",
        *TINY,
        "data=text",
        f"data.path={src}",
        "tokenizer=char",
        f"data.cache_dir={entry}",
        f"hydra.run.dir={tmp_path / 'mixed'}",
    )
    assert_user_error(proc, "data.cache_dir", "another tokenizer")
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "train-00000.bin", "val-00000.bin"]


def test_hf_dataset_local_and_offline_error(tmp_path):
    d = tmp_path / "hfdata"
    d.mkdir()
    rows = [{"text": f"document {i} " * 5, "id": i} for i in range(6)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_documents(f"hf:{d}@train") == [r["text"] for r in rows]
    with pytest.raises(UserError, match="no field 'body'"):
        read_documents(f"hf:{d}", text_field="body")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_cli(
        "tokenizer",
        "train",
        "data=text",
        "data.path=hf:nobody/no-such-dataset:cfg@train",
        f"hydra.run.dir={tmp_path / 'r'}",
        env=env,
    )
    assert_user_error(proc, "hf:nobody/no-such-dataset", "Hugging Face dataset")


# -- bad input: one line, exit 2, nothing written --------------------------------------------


def _cfg(tmp_path: Path, data_path, **tok) -> RunConfig:
    return replace(
        RunConfig(), data=_data(tmp_path, data_path, seq_len=16), tokenizer=replace(TokenizerConfig(), **tok)
    )


@pytest.mark.parametrize("case", ["missing", "whitespace", "non_utf8", "jsonl_field", "csv_field", "surrogate"])
def test_bad_sources(tmp_path, case):
    files = {
        "whitespace": ("ws.txt", b"  \n\t\n  \n"),
        "non_utf8": ("bad.txt", b"hello\n\xff\xfe world"),
        "jsonl_field": ("d.jsonl", b'{"body": "x"}\n'),
        "csv_field": ("d.csv", b"body,label\nhello,1\n"),
        # valid UTF-8 and valid JSON, but the escape is half a surrogate pair: not text
        "surrogate": ("s.jsonl", b'{"text": "fine"}\n{"text": "bad \\ud800 half"}\n'),
    }
    path = tmp_path / "missing.txt"
    if case in files:
        name, blob = files[case]
        path = tmp_path / name
        path.write_bytes(blob)
    needle = {
        "missing": "not found",
        "whitespace": "empty",
        "non_utf8": "byte offset 6",
        "jsonl_field": "'text'",
        "csv_field": "'text'",
        "surrogate": r"s.jsonl: line 2 holds an unpaired surrogate \\ud800",
    }[case]
    for name in ("char", "sentencepiece"):
        with pytest.raises(UserError, match=needle):
            load_corpus(_cfg(tmp_path, path, name=name, vocab_size=300))
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize(
    "name, blob, want",
    [
        ("bad.txt", b"hello there\n\xff world of text\n" * 20, "\ufffd world"),  # undecodable bytes
        (
            "s.jsonl",
            b'{"text": "half \\udc80 a pair and more text"}\n' * 20,
            "half \ufffd a pair",
        ),  # half a surrogate pair
    ],
)
def test_encoding_errors_replace_accepts_bad_text(tmp_path, name, blob, want):
    path = tmp_path / name
    path.write_bytes(blob)
    cfg = _cfg(tmp_path, path, name="char")
    cfg = replace(cfg, data=replace(cfg.data, encoding_errors="replace"))
    tok, splits = load_corpus(cfg)
    assert want in tok.decode(np.asarray(splits.train).tolist())


def test_vocab_too_large_via_cli_writes_nothing(tmp_path):
    src = tmp_path / "small.txt"
    src.write_text("a tiny corpus with few words\n" * 30)
    cache = tmp_path / "cache"
    proc = run_cli(
        "pretrain",
        *TINY,
        "data=text",
        f"data.path={src}",
        "tokenizer=sentencepiece",
        "tokenizer.vocab_size=5000",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert_user_error(proc, "tokenizer.vocab_size=5000")
    assert not any(p.is_file() for p in cache.rglob("*")) if cache.exists() else True
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_default_tokenizer_model_ignored_when_settings_differ(tmp_path):
    """A model at the default path whose settings JSON does not match is retrained, not used."""
    src = _wiki_small(tmp_path)
    cfg = _cfg(tmp_path, src, name="sentencepiece", vocab_size=500)
    tok = run_tokenizer(cfg, lambda: read_documents(str(src)))
    (model,) = (tmp_path / "cache" / "tokenizers").glob("*.model")
    sidecar = model.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["settings"]["split_digits"] = False
    sidecar.write_text(json.dumps(meta))
    model.write_bytes(b"not a model")  # would fail to load if it were used
    again = run_tokenizer(cfg, lambda: read_documents(str(src)))
    assert again.fingerprint() == tok.fingerprint()  # retrained (deterministically) from the corpus
