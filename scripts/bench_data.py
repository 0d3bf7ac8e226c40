"""Data pipeline benchmark: preparation throughput against the Hugging Face run_clm.py approach,
and CLM loader throughput. Writes a markdown results section.

    .venv/bin/python scripts/bench_data.py --repeats 3 --out /tmp/bench_data.md
    (writes a Markdown section; paste it into docs/benchmarks.md)

Preparation (text files -> packed tokens, same sentencepiece model on both sides):
- llmtrain: `llmtrain.data.prepare.prepare` (read, tokenize in chunks, append eos, write
  uint16 shards + metadata), nothing cached (word cache cleared, force=True).
- run_clm.py: `datasets.load_dataset("text")`, `Dataset.map(tokenize, batched=True)` then
  `map(group_texts, batched=True)` into blocks of 1024, as in transformers'
  examples/pytorch/language-modeling/run_clm.py (cache files off, so every repeat does the work).
Loader: `PackedWindows.batch(step)` over the prepared memmap at seq_len 1024.
Each measurement is repeated and the best kept (the machine is shared, so timings are noisy).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from itertools import chain
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtrain.config.schema import DataConfig, TokenizerConfig  # noqa: E402
from llmtrain.data import corpus, prepare as prep  # noqa: E402
from llmtrain.data.loader import PackedWindows  # noqa: E402
from llmtrain.data.sources import read_documents  # noqa: E402
from llmtrain.tokenizers.train import train_sentencepiece  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FILES = [SHARED / "wikitext2" / "valid.txt", SHARED / "tinyshakespeare" / "input.txt"]
BLOCK = 1024


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved_best(fns: dict, repeats: int) -> dict:
    """Best time of each function, the repeats taken in turns so that changing load on the shared
    machine hits every contender alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], best_of(fn, 1))
    return best


def llmtrain_prepare(tok, cache: Path, num_proc: int):
    def run():
        corpus._word_cache.clear()  # every repeat starts cold (the cache lives for the process)
        for f in FILES:
            data = replace(DataConfig(), path=str(f), cache_dir=str(cache), num_proc=num_proc)
            prep.prepare(data, tok, force=True, verbose=False)

    return run


def encoder_only(tok):
    """The raw sentencepiece encoder on every line in one batched call (no I/O, no packing)."""
    texts = [f.read_text(encoding="utf-8") for f in FILES]

    def run():
        for t in texts:
            tok.sp.encode(t.split("\n"), out_type=int)

    return run


def run_clm_prepare(tok, cache: Path, result: dict):
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    sp = tok.sp

    def tokenize_function(examples):
        return {"input_ids": sp.encode(examples["text"], out_type=int)}

    def group_texts(examples):  # run_clm.py's packing, verbatim in substance
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // BLOCK) * BLOCK
        result = {k: [t[i : i + BLOCK] for i in range(0, total_length, BLOCK)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    def run():
        raw = datasets.load_dataset(
            "text", data_files={"train": [str(f) for f in FILES]}, cache_dir=str(cache / "hf"), keep_in_memory=True
        )
        tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"], keep_in_memory=True)
        lm = tokenized.map(group_texts, batched=True, keep_in_memory=True)
        result["tokens"] = len(lm["train"]) * BLOCK

    return run


def bench_loader(tokens: np.ndarray, batch_size: int, steps: int, repeats: int) -> float:
    loader = PackedWindows(tokens, BLOCK, batch_size, seed=0)

    def run():
        for step in range(steps):
            loader.batch(step)

    return batch_size * BLOCK * steps / best_of(run, repeats)


def bench_old_loader(tokens: np.ndarray, batch_size: int, steps: int, repeats: int) -> float:
    """The previous implementation: the whole split as an int64 tensor, rows stacked per batch."""
    whole = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    loader = PackedWindows(tokens, BLOCK, batch_size, seed=0)

    def run():
        for step in range(steps):
            torch.stack([whole[s : s + BLOCK + 1] for s in loader.starts(step)])

    return batch_size * BLOCK * steps / best_of(run, repeats)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown section here")
    args = ap.parse_args()
    for f in FILES:
        if not f.exists():
            sys.exit(f"missing {f}")
    text_bytes = sum(f.stat().st_size for f in FILES)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf")  # never the user's cache
        docs = [d for f in FILES for d in read_documents(str(f))]
        tcfg = TokenizerConfig(name="sentencepiece", vocab_size=args.vocab_size)
        t0 = time.perf_counter()
        tok = train_sentencepiece(docs, tcfg, tmp / "sp.model")
        train_s = time.perf_counter() - t0
        print(f"sentencepiece bpe {tok.vocab_size} trained in {train_s:.1f}s", flush=True)

        hf_result: dict = {}
        times = interleaved_best(
            {
                "hf": run_clm_prepare(tok, tmp, hf_result),
                1: llmtrain_prepare(tok, tmp / "cache", 1),
                "encoder": encoder_only(tok),
            },
            args.repeats,
        )
        hf_s, hf_tokens, enc_s = times.pop("hf"), hf_result["tokens"], times.pop("encoder")
        ours = times
        for n, s in ours.items():
            print(f"llmtrain prepare num_proc={n}: {s:.3f}s, {text_bytes / s / 1e6:.2f} MB/s", flush=True)
        print(f"run_clm.py (datasets.map + group_texts): {hf_s:.3f}s, {text_bytes / hf_s / 1e6:.2f} MB/s", flush=True)

        data = replace(DataConfig(), path=str(FILES[0]), cache_dir=str(tmp / "cache"))
        splits = prep.prepare(data, tok, verbose=False).splits()
        train = splits.train
        metas = [prep.prepare(replace(data, path=str(f)), tok, verbose=False).meta for f in FILES]
        n_tok = sum(m["train"]["tokens"] + m["val"]["tokens"] for m in metas)
        loader = {b: bench_loader(train, b, 200, args.repeats) for b in (8, 32)}
        old = {b: bench_old_loader(train, b, 200, args.repeats) for b in (8, 32)}
        for b in loader:
            print(
                f"loader seq_len {BLOCK} batch {b}: {loader[b] / 1e6:.1f}M tokens/s "
                f"(previous implementation {old[b] / 1e6:.1f}M)",
                flush=True,
            )

    best = min(ours.values())
    lines = [
        "## Data pipeline",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_name()}, "
        f"{os.cpu_count()} CPU cores shared with other jobs (timings are noisy: each number is the best "
        f"of {args.repeats} repeats), Python {platform.python_version()}, torch {torch.__version__}.",
        "",
        "```",
        f".venv/bin/python scripts/bench_data.py --repeats {args.repeats}"
        + (f" --vocab-size {args.vocab_size}" if args.vocab_size != 8000 else "")
        + " --out /tmp/bench_data.md",
        "```",
        "",
        f"**Preparation** of WikiText-2 valid + Tiny Shakespeare ({text_bytes / 1e6:.2f} MB of text) into packed "
        f"tokens with the same sentencepiece BPE model (vocab {tok.vocab_size}):",
        "",
        "| pipeline | seconds | MB/s of text | speed-up |",
        "|---|---:|---:|---:|",
        f'| run_clm.py approach: `load_dataset("text")` + `map(tokenize)` + `map(group_texts)` | {hf_s:.2f} | '
        f"{text_bytes / hf_s / 1e6:.2f} | 1.0× |",
    ]
    for n, s in ours.items():
        lines.append(
            f"| `llmtrain data prepare`, data.num_proc={n} | {s:.2f} | {text_bytes / s / 1e6:.2f} | {hf_s / s:.1f}× |"
        )
    lines.append(
        f"| (reference: the sentencepiece encoder alone on every line, no I/O) | {enc_s:.2f} | "
        f"{text_bytes / enc_s / 1e6:.2f} | {hf_s / enc_s:.1f}× |"
    )
    lines += [
        "",
        f"llmtrain writes {n_tok:,} tokens (uint16 memmaps, eos per document, split into train/val); run_clm.py "
        f"ends with {hf_tokens:,} tokens in blocks of {BLOCK} held in Arrow tables. Target ≥ 2×: "
        f"{'met' if hf_s / best >= 2 else 'NOT met'} ({hf_s / best:.1f}×).",
        "",
        "Where the time goes: the last row (the raw encoder on every line) bounds any pipeline that encodes "
        "every line, as run_clm.py does; llmtrain finds word boundaries on the UTF-8 bytes with numpy, groups equal "
        "words with Arrow's hash table (no Python object per word), encodes each distinct space-led word once and "
        "gathers the ids of every occurrence with numpy "
        "(exact for sentencepiece BPE models with whitespace-split pieces and identity normalization, as "
        "llmtrain trains them; tested against whole-text encoding; other tokenizers are encoded line by line), "
        "and skips the Arrow conversion, the two `map` passes and the Python-list packing. data.num_proc "
        "(worker processes) only starts from 4M characters per split, so it does not apply to these files.",
        "",
        f"**Loader**: `PackedWindows.batch(step)` (CLM windows, seq_len {BLOCK}) over the prepared uint16 memmap "
        f"(WikiText-2 valid train split, {len(train):,} tokens), 200 steps:",
        "",
        "| batch size | tokens/s | previous implementation (whole split as an int64 tensor) |",
        "|---:|---:|---:|",
    ]
    for b in loader:
        lines.append(f"| {b} | {loader[b] / 1e6:.1f}M | {old[b] / 1e6:.1f}M |")
    lines += ["", f"Target > 10M tokens/s on CPU: {'met' if min(loader.values()) > 10e6 else 'NOT met'}.", ""]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
