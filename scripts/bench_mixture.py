"""Mixture correctness: observed per-source token fractions of data.sources against the weights.

    .venv/bin/python scripts/bench_mixture.py --windows 10000 --out /tmp/bench_mixture.md
    (writes a Markdown section; paste it into docs/benchmarks.md)

The real pretrain path: a composed `data=mixture` config over Tiny Shakespeare and WikiText-2
(its validation file), `load_corpus` (char tokenizer trained on both training splits, each source
prepared into a temporary cache), the clm objective's training source. It draws `--windows`
windows per seed as two ranks would (world_size=2, rank 0 and 1 interleaved), checks each row
against the token array of the source it was drawn from, and counts tokens per source from the
rows. Also timed, in the same process: building a batch from the mixture against PackedWindows
over one source.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtrain.config import register_configs  # noqa: E402
from llmtrain.config.compose import compose_run, hydra_session, validate  # noqa: E402
from llmtrain.data.loader import PackedWindows  # noqa: E402
from llmtrain.data.pipeline import load_corpus  # noqa: E402
from llmtrain.objectives import build_objective  # noqa: E402

# The shared corpora beside the repository, or where LLMTRAIN_TEST_DATA points (a git worktree).
SHARED = Path(os.environ.get("LLMTRAIN_TEST_DATA") or ROOT.parent / "shared" / "data")
SOURCES = {"shakespeare": SHARED / "tinyshakespeare" / "input.txt", "wikitext2": SHARED / "wikitext2" / "valid.txt"}
WEIGHTS = [(0.7, 0.3), (0.5, 0.5), (0.95, 0.05)]
SEEDS = [0, 1, 2]


def objective_for(weights, cache: str, seq_len: int, batch: int):
    srcs = ", ".join(f"{{path: {p}, weight: {w}, name: {n}}}" for (n, p), w in zip(SOURCES.items(), weights))
    overrides = ["data=mixture", f"data.sources=[{srcs}]", f"data.cache_dir={cache}"]
    overrides += [f"data.seq_len={seq_len}", f"data.batch_size={batch}", f"model.max_seq_len={seq_len}"]
    with hydra_session("pretrain"):
        cfg = validate(compose_run("pretrain", overrides))
    tok, splits = load_corpus(cfg)
    return cfg, tok, splits


def observed(cfg, tok, splits, seed: int, n_windows: int) -> np.ndarray:
    """Tokens per source over the first n_windows windows of two ranks, each row checked against
    the token array of the source it was drawn from."""
    obj = build_objective(cfg.objective, tok, splits, cfg.data, seed)
    ranks = [obj.train_source(rank, 2) for rank in (0, 1)]
    T = cfg.data.seq_len
    tokens = np.zeros(len(splits.names), dtype=np.int64)
    seen, step = 0, 0
    while seen < n_windows:  # global window order: step s of rank 0, then of rank 1
        for src in ranks:
            which, number = src.assign(step)
            batch = src.batch(step)
            for row, s, k in zip(batch["input_ids"], which, number):
                if seen == n_windows:
                    break
                windows = src.sources[s]
                start = windows.window_start(int(k))
                want = torch.from_numpy(np.asarray(windows.tokens[start : start + T], dtype=np.int64))
                assert torch.equal(row, want), "a row is not the window of its drawn source"
                tokens[s] += len(row)
                seen += 1
        step += 1
    return tokens


def time_batches(source, steps: int) -> float:
    t0 = time.perf_counter()
    for step in range(steps):
        source.batch(step)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    register_configs()
    lines = [
        f"`scripts/bench_mixture.py --windows {args.windows}`: seq_len {args.seq_len}, batch {args.batch} per "
        f"rank, 2 ranks, seeds {SEEDS}; {platform.python_version()}, torch {torch.__version__}.",
        "",
        "| weights (shakespeare, wikitext2) | observed token fractions per seed | worst deviation | worst relative |",
        "| --- | --- | --- | --- |",
    ]
    worst_all = worst_rel = 0.0
    with tempfile.TemporaryDirectory() as cache:
        for weights in WEIGHTS:
            cfg, tok, splits = objective_for(weights, cache, args.seq_len, args.batch)
            share = np.asarray(weights) / sum(weights)
            fracs = []
            for seed in SEEDS:
                t = observed(cfg, tok, splits, seed, args.windows)
                fracs.append(t / t.sum())
            worst = max(float(np.abs(f - share).max()) for f in fracs)
            rel = max(float((np.abs(f - share) / share).max()) for f in fracs)
            worst_all, worst_rel = max(worst_all, worst), max(worst_rel, rel)
            shown = "; ".join(", ".join(f"{x:.4f}" for x in f) for f in fracs)
            lines.append(f"| {weights[0]}, {weights[1]} | {shown} | {100 * worst:.3f} pp | {100 * rel:.2f}% |")
            print(lines[-1], flush=True)
        obj = build_objective(cfg.objective, tok, splits, cfg.data, 0)
        mixed, plain = obj.train_source(), PackedWindows(splits.parts[0].train, args.seq_len, args.batch, 0)
        t_mix = min(time_batches(mixed, 300) for _ in range(3))
        t_one = min(time_batches(plain, 300) for _ in range(3))
    lines += [
        "",
        f"Worst deviation from the weights: **{100 * worst_all:.3f} percentage points**, {100 * worst_rel:.2f}% of "
        "the weight (target: within 1%). "
        f"Building a batch: mixture {1e6 * t_mix:.0f} µs, PackedWindows over one source {1e6 * t_one:.0f} µs "
        f"(best of 3 x 300 batches, same process).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if worst_rel >= 0.01:
        sys.exit(f"a source's fraction is {100 * worst_rel:.2f}% off its weight (target: within 1%)")


if __name__ == "__main__":
    main()
