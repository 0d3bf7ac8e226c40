"""The run directory (llmtrain/run_dir.py): a fresh run never reuses one that holds checkpoints,
refused runs change nothing in it, one process at a time (the lock, taken over after kill -9),
metrics.jsonl reconciled on every start, and leftovers of dead processes' saves cleaned."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import TINY, assert_user_error, run_cli
from llmtrain.run_dir import LOCK, RunLock, clean_leftovers
from llmtrain.train.tracking import reconcile_metrics
from test_resume import popen_cli, train_losses, wait_for

BASE = [*TINY, "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2"]
DEAD = 2**31 - 1  # above any Linux pid_max: never a live process


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under run_dir with its mtime and bytes (Hydra's own job log left out)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.suffix != ".log"
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 3-step run: checkpoints/step_0000003, metrics of steps 1-3."""
    run = tmp_path_factory.mktemp("finished")
    proc = run_cli("pretrain", *BASE, "trainer.max_steps=3", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_refused_runs_change_nothing_and_overwrite_clears(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert not (run / LOCK).exists()  # released on exit
    before = snapshot(run)
    # A fresh run over checkpoints, a bad trainer.resume, a resume of another architecture.
    fresh = run_cli("pretrain", *BASE, "trainer.max_steps=3", f"hydra.run.dir={run}")
    assert_user_error(fresh, str(run), "trainer.resume=auto", "hydra.run.dir", "trainer.overwrite=true")
    assert_user_error(run_cli("pretrain", *BASE, "trainer.resume=sometimes", f"hydra.run.dir={run}"), "trainer.resume")
    other = run_cli("pretrain", *BASE, "model=llama_tiny", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert_user_error(other, "step_0000003")
    assert snapshot(run) == before

    proc = run_cli("pretrain", *BASE, "trainer.max_steps=2", "trainer.overwrite=true", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]
    assert sorted(train_losses(run)) == [1, 2]
    assert "max_steps: 2" in (run / "config.yaml").read_text()
    assert "max_steps: 2" in (run / ".hydra" / "config.yaml").read_text()
    # the job log is the new run's alone: the earlier run's output and the refused runs' errors are gone
    log = (run / "pretrain.log").read_text()
    assert "done at step 2" in log and "done at step 3" not in log and "error:" not in log


def test_second_process_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    p = popen_cli("pretrain", *BASE, "trainer.max_steps=100000", f"hydra.run.dir={run}")
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, p)
    second = run_cli("pretrain", *BASE, "trainer.resume=auto", f"hydra.run.dir={run}")
    assert_user_error(second, f"process {p.pid}", str(run))
    p.send_signal(signal.SIGKILL)  # before any checkpoint: the lock file stays behind, stale
    p.communicate()
    assert (run / LOCK).exists() and not (run / "checkpoints").exists()

    # Taken over; a resume that finds no checkpoint starts clean (no step twice).
    proc = run_cli("pretrain", *BASE, "trainer.max_steps=3", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" not in proc.stdout
    assert sorted(train_losses(run)) == [1, 2, 3]
    assert not (run / LOCK).exists()


def test_lock_is_exclusive_and_released(tmp_path):
    lock = RunLock.acquire(tmp_path)
    assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
    from llmtrain.errors import UserError

    with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
        RunLock.acquire(tmp_path)  # another open file description: flock refuses it
    lock.release()
    assert not (tmp_path / LOCK).exists()
    RunLock.acquire(tmp_path).release()


def test_lock_without_flock_falls_back_to_the_pid(tmp_path, monkeypatch):
    import errno
    import fcntl

    from llmtrain.errors import UserError

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / LOCK).write_text(f"{DEAD} {os.uname().nodename}\n")  # a crashed holder
    lock = RunLock.acquire(tmp_path)
    assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
    lock.release()
    (tmp_path / LOCK).write_text(f"{os.getppid()} {os.uname().nodename}\n")  # a live one
    with pytest.raises(UserError, match=f"process {os.getppid()}"):
        RunLock.acquire(tmp_path)


def _records(path: Path) -> list[tuple[int, str]]:
    return [(r["step"], next(k for k in r if k != "step")) for r in map(json.loads, path.read_text().splitlines())]


def test_metrics_reconciled_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val/loss": 3.0}]
    rows += [{"step": s, "train/loss": 1.0} for s in (1, 2, 3)]  # a run killed before its first save
    rows += [{"step": s, "train/loss": 2.0} for s in (1, 2, 3, 4, 5)] + [{"step": 4, "val/loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "train/lo')  # torn by a kill

    reconcile_metrics(path, 4)  # resumed from the checkpoint of step 4
    assert _records(path) == [(0, "val/loss"), (1, "train/loss"), (2, "train/loss"), (3, "train/loss"),
                              (4, "train/loss"), (4, "val/loss")]  # fmt: skip
    assert all(json.loads(line).get("train/loss", 2.0) == 2.0 for line in path.read_text().splitlines())
    mtime = path.stat().st_mtime_ns
    reconcile_metrics(path, 4)
    assert path.stat().st_mtime_ns == mtime  # already consistent: not rewritten

    reconcile_metrics(path, None)  # no checkpoint: the run starts from scratch
    assert not path.exists()


def test_leftovers_of_dead_processes_are_cleaned_live_ones_kept(tmp_path):
    root = tmp_path / "checkpoints"

    def step_dir(name: str, complete: bool = True) -> Path:
        d = root / name
        d.mkdir(parents=True)
        if complete:
            (d / "model.safetensors").write_bytes(b"w")
            (d / "meta.json").write_text(name)
        return d

    step_dir("step_0000001")
    step_dir("step_0000002", complete=False)  # a prune killed halfway: empty
    (step_dir("step_0000003", complete=False) / "model.safetensors").write_bytes(b"w")  # meta.json gone
    step_dir(f".tmp-step_0000004-{DEAD}", complete=False)  # a save killed before its rename
    live = step_dir(f".tmp-step_0000004-{os.getpid()}", complete=False)  # a save in progress
    step_dir(f".old-step_0000001-{DEAD}")  # a re-save killed before deleting the old copy
    step_dir(f".old-step_0000005-{DEAD}")  # a re-save killed between its two renames
    (tmp_path / f".config.yaml.tmp-{DEAD}").write_text("torn")
    (root / "step_0000001" / f".adapter.safetensors.tmp-{DEAD}").write_bytes(b"torn")
    live_file = tmp_path / f".metrics.jsonl.tmp-{os.getpid()}"
    live_file.write_text("")
    (tmp_path / "notes.tmp-1").write_text("not ours")  # not a temporary name of ours

    clean_leftovers(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [live.name, "step_0000001", "step_0000005"]
    assert (root / "step_0000005" / "meta.json").read_text() == ".old-step_0000005-" + str(DEAD)
    assert sorted(p.name for p in (root / "step_0000001").iterdir()) == ["meta.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live_file.name, "checkpoints", "notes.tmp-1"]
