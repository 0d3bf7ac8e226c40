"""Document masking on WikiText-2 articles: validation loss and step time with and without
data.document_mask, at the same steps, in one script run.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_document_mask.py --steps 200

1. Two `llmtrain pretrain` runs, identical but for data.document_mask (same seed, data, steps),
   side by side:
   each one's val/loss at every evaluation, from its metrics.jsonl. Each run validates its own
   way (the masked run scores each document alone and skips the target after each eos).
2. Both final checkpoints scored on the same validation split both ways, in this process, so the
   two models are compared on the same targets.
3. Step time (forward, backward, AdamW) of the same fresh model with and without the mask, in
   this process, the two taking turns in rounds so that load from other jobs hits both alike;
   the median round counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# the shared datasets beside the repository, or where LLMTRAIN_TEST_DATA points (a git worktree)
WIKI = Path(os.environ.get("LLMTRAIN_TEST_DATA") or ROOT.parent / "shared" / "data") / "wikitext2" / "valid.txt"


def overrides(args, work: Path) -> list[str]:
    return [
        "model=gpt_small",
        f"model.max_seq_len={args.seq_len}",
        "data=wikitext2",
        f"data.path={args.data}",
        *([f"data.doc_pattern='{args.doc_pattern}'"] if args.doc_pattern else []),
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}",
        "tokenizer=sentencepiece",
        "tokenizer.vocab_size=2000",
        f"data.cache_dir={work / 'cache'}",
        f"trainer.max_steps={args.steps}",
        f"trainer.eval_every={max(1, args.steps // 4)}",
        "trainer.log_every=10",
        "trainer.progress=false",
        "scheduler.warmup_steps=20",
    ]


def pretrain_both(args, work: Path) -> dict[bool, tuple[Path, dict[int, float]]]:
    """{mask: (run dir, {step: val/loss})} of the two pretrain runs. They run side by side (one
    thread each): their losses do not depend on timing, and step time is measured below."""
    procs = {}
    for mask in (False, True):
        run = work / f"mask_{str(mask).lower()}"
        cmd = [sys.executable, "-m", "llmtrain", "pretrain", *overrides(args, work), f"data.document_mask={mask}"]
        log = open(work / f"mask_{str(mask).lower()}.log", "w")  # noqa: SIM115 - closed with the process
        procs[mask] = (run, cmd, subprocess.Popen([*cmd, f"hydra.run.dir={run}"], stdout=log, stderr=log), log)
        if not mask:  # the first run trains the tokenizer and prepares the cache; the second reuses them
            while not list((work / "cache").glob("prepared/*/meta.json")) and procs[mask][2].poll() is None:
                time.sleep(1)
    out = {}
    for mask, (run, cmd, proc, log) in procs.items():
        if proc.wait():
            sys.exit(f"failed: {' '.join(cmd)}\n{(work / f'mask_{str(mask).lower()}.log').read_text()[-2000:]}")
        log.close()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        out[mask] = run, {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    return out


def composed(args, work: Path):
    from llmtrain.config import register_configs
    from llmtrain.config.compose import compose_run, hydra_session, validate

    register_configs()
    with hydra_session("pretrain"):
        return validate(compose_run("pretrain", overrides(args, work)))


def objective(cfg, tok, splits, mask: bool):
    import dataclasses

    from llmtrain.objectives import build_objective

    data = dataclasses.replace(cfg.data, document_mask=mask)
    return build_objective(cfg.objective, tok, splits, data, cfg.trainer.seed)


@torch.no_grad()
def score(model, obj) -> float:
    total = count = 0.0
    for batch in obj.val_batches():
        out = obj.loss(model, batch)
        total += out.loss.item() * int(out.n_targets)
        count += int(out.n_targets)
    return total / count


def step_times(cfg, tok, splits, rounds: int, steps: int) -> dict[bool, float]:
    """Median over rounds of the mean ms per training step, the two settings taking turns."""
    from llmtrain.models import build_model, resolve_model_config

    times: dict[bool, list[float]] = {False: [], True: []}
    setups = {}
    for mask in (False, True):
        torch.manual_seed(0)
        model = build_model(resolve_model_config(cfg.model, tok)).train()
        setups[mask] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), objective(cfg, tok, splits, mask))
    for r in range(rounds + 1):  # round 0 warms up
        for mask in (False, True) if r % 2 else (True, False):
            model, opt, obj = setups[mask]
            source = obj.train_source()
            start = time.perf_counter()
            for s in range(steps):
                loss = obj.loss(model, source.batch(r * steps + s)).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if r:
                times[mask].append((time.perf_counter() - start) / steps * 1e3)
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=WIKI)
    ap.add_argument("--doc-pattern", default=None, help="data.doc_pattern (default: data=wikitext2's, articles)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (each setting --time-steps steps)")
    ap.add_argument("--time-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-docmask-"))
    runs = pretrain_both(args, work)

    from llmtrain import checkpoints
    from llmtrain.data.pipeline import load_corpus

    cfg = composed(args, work)
    loaded = {mask: checkpoints.load(runs[mask][0]) for mask in runs}
    tok, splits = load_corpus(cfg, tokenizer=loaded[False].tokenizer)
    cross = {
        (trained, scored): score(loaded[trained].model, objective(cfg, tok, splits, scored))
        for trained in (False, True)
        for scored in (False, True)
    }
    # How often the mask matters: training windows that hold a boundary, targets it skips
    src = objective(cfg, tok, splits, True).train_source()
    batches = [src.batch(s) for s in range(args.steps)]
    crossing = float(np.mean([bool((row == tok.eos_id).any()) for b in batches for row in b["input_ids"]]))
    skipped = sum(int((b["labels"] == -100).sum()) for b in batches) / sum(b["labels"].numel() for b in batches)
    ms = step_times(cfg, tok, splits, args.rounds, args.time_steps)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "overrides": overrides(args, Path("WORK")),
        "train_tokens": len(splits.train),
        "val_tokens": len(splits.val),
        "windows_with_a_boundary": crossing,
        "targets_skipped": skipped,
        "val_loss_by_step": {str(m): runs[m][1] for m in runs},
        "cross_eval": {f"trained_mask={t} scored_mask={s}": v for (t, s), v in cross.items()},
        "step_ms": {str(m): round(v, 2) for m, v in ms.items()},
        "step_time_ratio_mask_over_plain": ms[True] / ms[False],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
