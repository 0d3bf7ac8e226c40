"""Tokenizer training benchmark: HF byte-level BPE, HF WordPiece and sentencepiece BPE trained
side by side, in one process, on the same text and vocabulary size. Writes a markdown section.

    .venv/bin/python scripts/bench_tokenizers.py --vocab 8000 --repeats 3 --out /tmp/bench_tok.md

Corpus: WikiText-2 valid, Tiny Shakespeare and the SciTLDR training abstracts (../shared/data);
the last 10% of each source (by documents) is held out. Per tokenizer:
- training seconds: the llmtrain training call (`train_hf` / `train_sentencepiece`), best of
  --repeats, the contenders taken in turns so changing load hits each alike;
- bytes per token on the held-out text (UTF-8 bytes / tokens; higher = fewer tokens);
- encode throughput: MB/s of held-out text through the tokenizer's `encode_batch` (one call
  over all held-out documents), best of --repeats;
- unknown-token rate on the held-out text.
The `tokenizers` library's own WordPieceTrainer is timed too, for reference: llmtrain's
wordpiece trains the same algorithm reproducibly (see llmtrain/tokenizers/hf_train.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtrain.config.schema import TokenizerConfig  # noqa: E402
from llmtrain.tokenizers.hf import HFTokenizer  # noqa: E402
from llmtrain.tokenizers.hf_train import BERT_SPECIALS, WordPieceTokenizer, train_hf  # noqa: E402
from llmtrain.tokenizers.train import train_sentencepiece  # noqa: E402

SHARED = Path(os.environ.get("LLMTRAIN_TEST_DATA") or ROOT.parent / "shared" / "data")


def documents() -> dict[str, list[str]]:
    import re

    wiki = (SHARED / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    shakespeare = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    tldr = [json.loads(line) for line in (SHARED / "scitldr" / "train.jsonl").read_text().splitlines()]
    return {
        "wikitext2": [d for d in re.split(r"(?m)^(?= = [^=].* = $)", wiki) if d.strip()],
        "tinyshakespeare": [p for p in shakespeare.split("\n\n") if p.strip()],
        "scitldr": [" ".join(r["source"]) for r in tldr],
    }


def split(docs: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    train, held = [], []
    for ds in docs.values():
        cut = int(len(ds) * 0.9)
        train += ds[:cut]
        held += ds[cut:]
    return train, held


def hf_wordpiece_trainer(train: list[str], vocab: int) -> HFTokenizer:
    """The `tokenizers` library's WordPieceTrainer, as its docs use it (reference row)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    specials = list(dict.fromkeys(BERT_SPECIALS.values()))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(train, trainer)
    return WordPieceTokenizer(tk.to_str())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown section here")
    args = ap.parse_args()

    train, held = split(documents())
    train_mb = sum(len(d.encode()) for d in train) / 1e6
    held_bytes = sum(len(d.encode()) for d in held)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    v = args.vocab
    contenders = {
        "HF byte-level BPE (`tokenizer=bpe`)": lambda: train_hf(train, TokenizerConfig(name="bpe", vocab_size=v)),
        "HF WordPiece (`tokenizer=wordpiece`, lowercase)": lambda: train_hf(
            train, TokenizerConfig(name="wordpiece", vocab_size=v, lowercase=True)
        ),
        "sentencepiece BPE (`tokenizer=sentencepiece`)": lambda: train_sentencepiece(
            train, TokenizerConfig(name="sentencepiece", vocab_size=v), tmp / "sp.model"
        ),
        "reference: `tokenizers` WordPieceTrainer (not reproducible)": lambda: hf_wordpiece_trainer(train, v),
    }
    best = {k: float("inf") for k in contenders}
    toks = {}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            toks[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)

    rows = []
    for name, tok in toks.items():
        ids = tok.encode_batch(held)
        n = sum(map(len, ids))
        unk = sum(i.count(tok.unk_id) for i in ids)
        enc = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tok.encode_batch(held)
            enc = min(enc, time.perf_counter() - t0)
        rows.append(
            f"| {name} | {tok.vocab_size} | {best[name]:.2f} | {held_bytes / n:.2f} | "
            f"{held_bytes / 1e6 / enc:.1f} | {100 * unk / n:.3f}% |"
        )
        print(rows[-1], flush=True)

    import sentencepiece
    import tokenizers

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            f"Measured {now}, {platform.machine()} 2-core CPU, busy with other jobs (load average "
            f"{os.getloadavg()[0]:.1f}); Python {platform.python_version()}, tokenizers {tokenizers.__version__}, "
            f"sentencepiece {sentencepiece.__version__}; best of {args.repeats}, contenders in turns.",
            "",
            "```bash",
            f".venv/bin/python scripts/bench_tokenizers.py --vocab {v} --repeats {args.repeats}",
            "```",
            "",
            f"Training text {train_mb:.2f} MB ({len(train):,} documents of WikiText-2 valid, Tiny Shakespeare and "
            f"SciTLDR train abstracts); held out the last 10% of each, {held_bytes / 1e6:.2f} MB "
            f"({len(held):,} documents).",
            "",
            "| tokenizer | vocab | training s | held-out bytes/token | encode MB/s | unk |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
