"""evaluate's lm and classification paths against a plain torch.no_grad loop over the same batches.

    .venv/bin/python scripts/bench_evaluate.py                 # gpt_small on Tiny Shakespeare, SST-2 dev
    .venv/bin/python scripts/bench_evaluate.py --rounds 5 --keep /tmp/bench_eval

It trains a gpt_small checkpoint for a few steps and fine-tunes a classifier from it (CLI
subprocesses; --keep reuses them), then, in this one process, takes turns over --rounds rounds:
  lm:             the whole `lm` eval task (reads and tokenizes the validation split, scores it)
                  vs model(x) + summed cross-entropy over the same windows, prebuilt;
  classification: the whole `classification` eval task (SST-2 dev) vs model(x).argmax over the
                  same batches, prebuilt.
Each reports its best round, in process CPU time (run with OMP_NUM_THREADS=1: one thread, so
load from other jobs changes it little) and in wall time; both sides compute the same numbers
(checked).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("LLMTRAIN_TEST_DATA", ROOT.parent / "shared" / "data")) / "sst2"


def cli(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "llmtrain", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-2000:]}")


def checkpoints_in(work: Path, sst2: Path) -> tuple[Path, Path]:
    lm, cls = work / "lm", work / "cls"
    if not (lm / "checkpoints").exists():
        cli(
            "pretrain", "+experiment=gpt_small", "trainer.max_steps=20", "trainer.progress=false", f"hydra.run.dir={lm}"
        )
    if not (cls / "checkpoints").exists():
        train = work / "train.tsv"
        train.write_text("".join((sst2 / "train.tsv").read_text().splitlines(True)[:401]))
        cli(
            "finetune",
            f"init_from={lm}",
            "task=classification",
            f"task.train_path={train}",
            f"task.val_path={sst2 / 'dev.tsv'}",
            "task.text_field=sentence",
            "data.seq_len=64",
            "trainer.max_steps=2",
            "trainer.progress=false",
            f"hydra.run.dir={cls}",
        )
    return lm, cls


def context(checkpoint: Path, run_dir: Path, overrides: list[str]):
    from llmtrain import checkpoints
    from llmtrain.config.compose import compose_run, hydra_session, validate
    from llmtrain.config.schema import register_configs
    from llmtrain.eval.suite import EvalContext

    register_configs()
    with hydra_session("evaluate"):
        cfg = validate(compose_run("evaluate", [f"checkpoint={checkpoint}", f"hydra.run.dir={run_dir}", *overrides]))
    cpu = torch.device("cpu")
    loaded = checkpoints.load(str(checkpoint), cpu)
    return EvalContext(cfg, cpu, "fp32", run_dir, lambda: loaded), loaded


def lm_batches(loaded, cfg):
    from llmtrain.config.schema import DataConfig
    from llmtrain.data.corpus import read_split, tokenize_split
    from llmtrain.data.loader import sequential_windows

    data = DataConfig(
        **{k: v for k, v in loaded.meta["config"]["data"].items() if k in DataConfig.__dataclass_fields__}
    )
    val = tokenize_split(read_split(data), loaded.tokenizer).val
    return list(sequential_windows(val, data.seq_len, data.batch_size, cfg.trainer.eval_batches))


def best_of(fns: dict, rounds: int) -> dict:
    """name -> (best process CPU seconds, best wall seconds, value) over the rounds."""
    best = {k: (float("inf"), float("inf"), None) for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            best[k] = (min(best[k][0], cpu), min(best[k][1], wall), out)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="directory for the checkpoints (reused)")
    ap.add_argument("--sst2", type=Path, default=SST2)
    ap.add_argument("--max-examples", type=int, default=0, help="classification examples (0: all of dev)")
    a = ap.parse_args()
    from llmtrain.eval.suite import EVAL_TASKS

    work = a.keep or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    lm_ckpt, cls_ckpt = checkpoints_in(work, a.sst2)

    lm_ctx, lm_loaded = context(lm_ckpt, work / "ev_lm", [])
    model = lm_loaded.model.eval()
    batches = lm_batches(lm_loaded, lm_ctx.cfg)

    @torch.no_grad()
    def plain_lm():
        total = count = 0.0
        for b in batches:
            logits = model(b["input_ids"])
            total += F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum").item()
            count += (b["labels"] != -100).sum().item()
        return total / count

    cls_ctx, cls_loaded = context(cls_ckpt, work / "ev_cls", [f"eval.max_examples={a.max_examples}"])
    task, cmodel = cls_loaded.task, cls_loaded.model.eval()
    examples = task.val_examples()[: a.max_examples or None]
    cbatches = [
        task.collate(examples[i : i + cls_ctx.cfg.eval.batch_size])
        for i in range(0, len(examples), cls_ctx.cfg.eval.batch_size)
    ]

    @torch.no_grad()
    def plain_cls():
        preds = [cmodel(b["input_ids"], b["attention_mask"], b["token_type_ids"]).argmax(-1) for b in cbatches]
        labels = torch.cat([b["labels"] for b in cbatches])
        return (torch.cat(preds) == labels).float().mean().item()

    res = best_of(
        {
            "lm task": lambda: EVAL_TASKS["lm"](lm_ctx).metrics["val/loss"],
            "lm plain": plain_lm,
            "classification task": lambda: EVAL_TASKS["classification"](cls_ctx).metrics["classification/accuracy"],
            "classification plain": plain_cls,
        },
        a.rounds,
    )
    print(f"torch threads {torch.get_num_threads()}, {len(batches)} lm batches, {len(cbatches)} classification batches")
    print(
        "| path | evaluate CPU s (wall) | plain no_grad loop CPU s (wall) | speed, CPU (wall) "
        "| value (evaluate / plain) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name in ("lm", "classification"):
        (ce, we, ve), (cp, wp, vp) = res[f"{name} task"], res[f"{name} plain"]
        print(
            f"| {name} | {ce:.3f} ({we:.3f}) | {cp:.3f} ({wp:.3f}) | {cp / ce:.3f}x ({wp / we:.3f}x) "
            f"| {ve:.6f} / {vp:.6f} |"
        )
        assert abs(ve - vp) < 1e-5, (name, ve, vp)


if __name__ == "__main__":
    main()
