"""Several processes on CPU (gloo), through torchrun and through `trainer.devices=2`:
DDP equals gradient accumulation, FSDP (+ activation checkpointing) matches DDP and resumes from
its own checkpoint. `trainer.compile=true` is not tested here (tens of seconds of CPU compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_cli

STEPS = 6
# Constant lr: a 3-step run resumed to 6 steps is the same computation as one 6-step run.
BASE = [
    *TINY,
    "model.dropout=0.0",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.eval_batches=2",
    "optim.lr=3e-3",
    "scheduler.name=constant",
    "scheduler.warmup_steps=0",
    "trainer.device=cpu",
]
ENV = {"OMP_NUM_THREADS": "1"}


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}
    assert len(out) == sum("train/loss" in r for r in recs), "a step was logged twice (two writers?)"
    return out


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def only_run_dir(cwd: Path) -> Path:
    """The one run directory Hydra created under cwd/outputs (fails if ranks made their own)."""
    dirs = [p for p in (cwd / "outputs").glob("*/*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    assert len(list(cwd.rglob("metrics.jsonl"))) == 1
    return dirs[0]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "llmtrain", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **ENV},
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """torchrun, 2 ranks x grad_accum 1, no hydra.run.dir: rank 0's ${now:} directory is used by both."""
    cwd = tmp_path_factory.mktemp("ddp")
    proc = torchrun("pretrain", *BASE, f"trainer.max_steps={STEPS}", "trainer.strategy=ddp", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    val_lines = [ln for ln in out.splitlines() if ln.startswith(f"step {STEPS}: val/loss")]
    assert len(val_lines) == 1, out  # only rank 0 prints
    run = only_run_dir(cwd)
    assert not (run / ".lock").exists()  # rank 0's lock, released at the end
    return run


def test_ddp_two_ranks_equals_one_rank_with_twice_the_accumulation(ddp_run, tmp_path):
    single = tmp_path / "single"
    proc = run_cli(
        "pretrain", *BASE, f"trainer.max_steps={STEPS}", "trainer.grad_accum=2", f"hydra.run.dir={single}", env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(ddp_run), losses(single)
    assert sorted(a) == list(range(1, STEPS + 1)) and a.keys() == b.keys()
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
    assert a[STEPS] < a[1] - 0.05  # it really trained
    assert max_diff(weights(ddp_run, STEPS), weights(single, STEPS)) <= 1e-6


def test_fsdp_self_launched_matches_ddp_and_resumes(ddp_run, tmp_path):
    # trainer.devices=2 without torchrun: the CLI starts both ranks; one run dir, one metrics.jsonl.
    proc = run_cli(
        "pretrain", *BASE, "trainer.max_steps=3", "trainer.devices=2", "trainer.strategy=fsdp", cwd=tmp_path, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)
    assert (run / "checkpoints" / "step_0000003" / "train_state.pt").is_file()
    # Consolidated weights in the same format as DDP's (evaluate/generate read them unchanged).
    assert weights(run, 3).keys() == weights(ddp_run, STEPS).keys()

    # The second half also recomputes activations (trainer.activation_checkpointing): same numbers.
    proc = run_cli(
        "pretrain",
        *BASE,
        f"trainer.max_steps={STEPS}",
        "trainer.devices=2",
        "trainer.strategy=fsdp",
        "trainer.activation_checkpointing=true",
        "trainer.resume=auto",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = losses(run), losses(ddp_run)
    assert a.keys() == b.keys()
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    assert max_diff(weights(run, STEPS), weights(ddp_run, STEPS)) <= 1e-5
