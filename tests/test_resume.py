"""Exact resume after SIGKILL, graceful SIGTERM, corrupt checkpoints, the NaN guard and checkpoint
retention: each through the real CLI in its own process (CPU, float32)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, assert_user_error, run_cli

# log_every=1: every step's loss is recorded; constant lr so segments are comparable at any length.
BASE = [
    *TINY,
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.eval_batches=2",
    "optim.lr=3e-3",
    "scheduler.name=constant",
    "scheduler.warmup_steps=0",
]


def train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["train/loss"]
    return out


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def popen_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "llmtrain", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"run ended before the condition: {proc.communicate()}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    steps = 20
    ref = tmp_path / "ref"
    proc = run_cli("pretrain", *BASE, f"trainer.max_steps={steps}", "trainer.ckpt_every=5", f"hydra.run.dir={ref}")
    assert proc.returncode == 0, proc.stderr[-2000:]

    run = tmp_path / "killed"
    p = popen_cli("pretrain", *BASE, f"trainer.max_steps={steps}", "trainer.ckpt_every=5", f"hydra.run.dir={run}")
    wait_for(lambda: (ckpt(run, 10) / "meta.json").exists(), p)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    killed_at = max(train_losses(run))
    assert killed_at < steps, "the run finished before it was killed: nothing was tested"

    proc = run_cli(
        "pretrain",
        *BASE,
        f"trainer.max_steps={steps}",
        "trainer.ckpt_every=5",
        "trainer.resume=auto",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr
    got, want = train_losses(run), train_losses(ref)
    assert sorted(got) == list(range(1, steps + 1))  # the log reads as one run, no duplicates
    assert got == want  # exact float equality at every step, before and after the kill
    a, b = load_file(ckpt(run, steps) / "model.safetensors"), load_file(ckpt(ref, steps) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # a save torn by the kill is cleaned up


@pytest.fixture(scope="module")
def sigtermed(tmp_path_factory) -> tuple[Path, int]:
    """A run stopped by SIGTERM: (run dir, the step it stopped at)."""
    run = tmp_path_factory.mktemp("sigterm")
    p = popen_cli("pretrain", *BASE, "trainer.max_steps=100000", f"hydra.run.dir={run}")
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    # Interrupted, not finished: 128 + SIGTERM, and the last line says how to continue.
    assert p.returncode == 143, err[-2000:]
    last = max(train_losses(run))
    assert out.strip().splitlines()[-1] == (
        f"interrupted at step {last}; checkpoint {ckpt(run, last)}; resume with trainer.resume=auto hydra.run.dir={run}"
    )
    assert "done at step" not in out and "Traceback" not in err
    # trainer.eval_on_stop (default true): the validation pass ran at the step it stopped at,
    # though eval_every=0 here.
    vals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val/loss" in ln]
    assert [v["step"] for v in vals] == [last]
    return run, last


def test_sigterm_saves_at_step_boundary_and_resume_continues(sigtermed, tmp_path):
    run, stopped = sigtermed
    assert (ckpt(run, stopped) / "train_state.pt").is_file()
    state = torch.load(ckpt(run, stopped) / "train_state.pt", weights_only=True)
    assert state["step"] == stopped

    proc = run_cli("pretrain", *BASE, f"trainer.max_steps={stopped + 2}", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"at step {stopped}" in proc.stdout + proc.stderr
    assert max(train_losses(run)) == stopped + 2
    assert (ckpt(run, stopped + 2) / "model.safetensors").is_file()


def test_second_ctrl_c_waits_for_the_save(tmp_path):
    """Ctrl-C three times in a row: the first stops at the step boundary, the others wait for the
    save instead of aborting it (no KeyboardInterrupt, no torn checkpoint); exit 130."""
    run = tmp_path / "run"
    p = popen_cli("pretrain", *BASE, "trainer.max_steps=100000", "trainer.eval_on_stop=false", f"hydra.run.dir={run}")
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, p)
    for _ in range(3):
        p.send_signal(signal.SIGINT)
        time.sleep(0.03)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped = max(train_losses(run))
    assert out.strip().splitlines()[-1].startswith(f"interrupted at step {stopped}; checkpoint {ckpt(run, stopped)};")
    assert torch.load(ckpt(run, stopped) / "train_state.pt", weights_only=True)["step"] == stopped
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list((run / "checkpoints").glob(".old-*"))
    assert "val/loss" not in metrics.read_text()  # trainer.eval_on_stop=false


def test_time_based_checkpoints_appear_mid_run(tmp_path):
    # 0.001 minutes = 60 ms: with ckpt_every=0, saves still come at step boundaries during the run.
    run = tmp_path / "run"
    proc = run_cli(
        "pretrain",
        *BASE,
        "trainer.max_steps=30",
        "trainer.keep_last=0",
        "trainer.ckpt_every_minutes=0.001",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert steps[-1] == 30 and len(steps) >= 2, steps  # mid-run saves, plus the end
    assert all((ckpt(run, s) / "train_state.pt").is_file() for s in steps)


def _copy_run(src: Path, dst: Path) -> Path:
    """A copy holding only the newest checkpoint: with an older intact one, resume=auto would fall
    back to it (tests/test_durability.py); alone, a corrupt checkpoint is an error."""
    import shutil

    shutil.copytree(src, dst)
    for older in sorted((dst / "checkpoints").glob("step_*"))[:-1]:
        shutil.rmtree(older)
    return dst


def test_truncated_weights_exit_2_naming_the_file(sigtermed, tmp_path):
    run = _copy_run(sigtermed[0], tmp_path / "run")
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    f = newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run_cli("pretrain", *BASE, "trainer.max_steps=100000", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert_user_error(proc, str(f))


def test_garbage_train_state_exit_2_naming_the_file(sigtermed, tmp_path):
    run = _copy_run(sigtermed[0], tmp_path / "run")
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    (newest / "train_state.pt").write_bytes(b"this is not a torch file" * 10)
    proc = run_cli("pretrain", *BASE, "trainer.max_steps=100000", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert_user_error(proc, str(newest / "train_state.pt"))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    # lr=1e30 without clipping: the first update blows the weights up, so from step 2 on the loss
    # is NaN (checked below from the log, so the guard is really exercised).
    run = tmp_path / "nan"
    proc = run_cli(
        "pretrain",
        *BASE,
        "trainer.max_steps=50",
        "trainer.ckpt_every=1",
        "trainer.max_bad_steps=3",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        f"hydra.run.dir={run}",
    )
    assert_user_error(proc, "trainer.max_bad_steps=3", f"the last good checkpoint is {ckpt(run, 1)}")
    losses = train_losses(run)
    assert math.isfinite(losses[1]) and all(not math.isfinite(float(v)) for s, v in losses.items() if s > 1)
    assert max(losses) == 4  # streak of 3 non-finite steps (2, 3, 4): stopped at the first log after
    # Checkpoints only of finite steps: step 1's (skipped updates are never saved), weights finite.
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == ["step_0000001"]
    weights = load_file(ckpt(run, 1) / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_guard_without_a_checkpoint_says_so(tmp_path):
    run = tmp_path / "nan"
    proc = run_cli(
        "pretrain",
        *BASE,
        "trainer.max_steps=50",
        "trainer.max_bad_steps=3",
        "trainer.ckpt_every_minutes=0",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        f"hydra.run.dir={run}",
    )
    assert_user_error(proc, "trainer.max_bad_steps=3", "no checkpoint had been saved yet")
    assert "last good checkpoint" not in proc.stderr
    assert not list((run / "checkpoints").glob("step_*"))


def test_diverged_val_loss_never_becomes_best(tmp_path):
    """max_bad_steps=0 lets a diverged run save its final checkpoint: a NaN or inf val/loss there
    must not take best_checkpoint from a finite one, nor become best on its own."""
    from llmtrain.train import checkpoint as ck

    model = torch.nn.Linear(2, 2)
    root = tmp_path / "checkpoints"
    for step, v in {1: math.inf, 2: math.nan}.items():
        ck.save_checkpoint(root, step, model, {"metrics": {"val/loss": v}, "metrics_step": step})
    assert ck.best_checkpoint(root) is None and not (tmp_path / "best_checkpoint").exists()
    ck.save_checkpoint(root, 3, model, {"metrics": {"val/loss": 5.0}, "metrics_step": 3})
    for step, v in {4: math.inf, 5: -math.inf, 6: math.nan}.items():
        ck.save_checkpoint(root, step, model, {"metrics": {"val/loss": v}, "metrics_step": step}, keep_last=2)
    assert ck.best_checkpoint(root) == root / "step_0000003"
    assert (tmp_path / "best_checkpoint").read_text().strip() == "checkpoints/step_0000003"


def test_keep_last_also_keeps_best_by_val_loss(tmp_path):
    from llmtrain.train import checkpoint as ck

    model = torch.nn.Linear(2, 2)
    root = tmp_path / "checkpoints"
    val = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.6}  # best at step 2
    for step, v in val.items():
        ck.save_checkpoint(root, step, model, {"metrics": {"val/loss": v}, "metrics_step": step}, keep_last=2)
    # A checkpoint whose metrics were measured at another step does not compete for best.
    ck.save_checkpoint(root, 6, model, {"metrics": {"val/loss": 0.1}, "metrics_step": 5}, keep_last=2)
    assert sorted(p.name for p in ck.list_checkpoints(root)) == ["step_0000002", "step_0000005", "step_0000006"]
    assert (tmp_path / "best_checkpoint").read_text().strip() == "checkpoints/step_0000002"
    assert ck.best_checkpoint(root) == root / "step_0000002"


def test_mlm_resume_restores_every_trained_parameter(tmp_path):
    """objective=mlm leaves BERT's NSP head and pooler without gradients: they are frozen at the
    start (no optimizer state to miss), so a resumed MLM run continues exactly."""
    mlm = [*BASE, "model=bert_tiny", "objective=mlm"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = run_cli("pretrain", *mlm, "trainer.max_steps=6", f"hydra.run.dir={ref}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "frozen (pooler" in proc.stdout or "frozen (nsp" in proc.stdout, proc.stdout
    assert run_cli("pretrain", *mlm, "trainer.max_steps=3", f"hydra.run.dir={run}").returncode == 0
    proc = run_cli("pretrain", *mlm, "trainer.max_steps=6", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {s: v for s, v in train_losses(run).items() if s > 3} == {
        s: v for s, v in train_losses(ref).items() if s > 3
    }
    w1, w2 = load_file(ckpt(ref, 6) / "model.safetensors"), load_file(ckpt(run, 6) / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
