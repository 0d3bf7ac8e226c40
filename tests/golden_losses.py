"""Record (or compare) the per-step training losses of a 20-step gpt_small pretrain and of
20-step fine-tunes from it (task lm, and task classification on an SST-2 slice).

    python tests/golden_losses.py --write     # once, on the code the fixture must match

tests/test_golden.py runs the same commands and compares against tests/fixtures/golden_losses.json.
One thread: the losses must not depend on how torch splits a matmul over the cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "golden_losses.json"
SST2 = ROOT / "tests" / "fixtures" / "sst2_slice"
COMMON = [
    "trainer.max_steps=20",
    "trainer.log_every=1",
    "trainer.eval_every=10",
    "trainer.eval_batches=4",
    "trainer.progress=false",
    "trainer.chunked_loss=false",  # the fixture was recorded on the plain full-logits loss
]


def _run(args: list[str], run_dir: Path) -> list[float]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain", *args, *COMMON, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def record(base: Path) -> dict[str, list[float]]:
    pre = base / "pretrain"
    # optim=adamw: the preset's optimizer when the fixture was recorded (its default is Muon now)
    out = {"pretrain_gpt_small": _run(["pretrain", "+experiment=gpt_small", "optim=adamw"], pre)}
    out["finetune_lm"] = _run(
        ["finetune", f"init_from={pre}", "data.seq_len=64", "data.batch_size=8"], base / "finetune_lm"
    )
    out["finetune_classification"] = _run(
        [
            "finetune",
            f"init_from={pre}",
            "task=classification",
            f"task.train_path={SST2}/train.tsv",
            f"task.val_path={SST2}/dev.tsv",
            "task.text_field=sentence",
            "data.seq_len=64",
            "data.batch_size=8",
        ],
        base / "finetune_cls",
    )
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="llmtrain-golden-") as d:
        losses = record(Path(d))
    print(json.dumps(losses, indent=1))
    if "--write" in sys.argv:
        FIXTURE.write_text(json.dumps(losses, indent=1) + "\n")
        print(f"wrote {FIXTURE}")
