"""Checkpoints that prove their integrity and survive kill -9 and a full disk (issue 15, items
6-8): sha256 records verified on every load, resume falling back past a corrupt checkpoint,
one file mode for every file, ENOSPC as one line with nothing lost, a kill inside a save."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError

from conftest import ROOT, TINY, assert_user_error, run_cli
from llmtrain import checkpoints, files
from llmtrain.errors import UserError
from llmtrain.train import checkpoint as ck

BASE = [*TINY, "trainer.eval_every=0", "trainer.eval_batches=2", "trainer.keep_last=0"]


def _save(root, step, train_state=True):
    torch.manual_seed(step)
    model = torch.nn.Linear(64, 64)  # 16 KB of weights: room to zero 4 KB in the middle
    return ck.save_checkpoint(root, step, model, {}, {"step": step, "w": torch.ones(8)} if train_state else None)


def _zero_middle(f, n=4096):
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid - n // 2 : mid + n // 2] = bytes(n)
    f.write_bytes(bytes(data))


def test_meta_records_checksums_and_verify_names_the_corrupt_file(tmp_path):
    c = _save(tmp_path / "checkpoints", 1)
    meta = json.loads((c / ck.META).read_text())
    assert set(meta[ck.FILES]) == {ck.WEIGHTS, ck.STATE}
    for name, rec in meta[ck.FILES].items():
        assert rec == {"sha256": files.sha256_file(c / name)[0], "size": (c / name).stat().st_size}
    ck.verify(c)
    _zero_middle(c / ck.WEIGHTS)
    with pytest.raises(UserError, match=f"{c / ck.WEIGHTS} is corrupt: its sha256"):
        ck.verify(c)
    ck.verify(c, [ck.STATE])  # only what is asked for
    (c / ck.STATE).write_bytes(b"x")
    with pytest.raises(UserError, match=f"{c / ck.STATE} is corrupt: 1 bytes"):
        ck.verify(c, [ck.STATE])
    # a checkpoint from before the record: nothing to verify, it loads as before
    (c / ck.META).write_text(json.dumps({k: v for k, v in meta.items() if k != ck.FILES}))
    ck.verify(c)


def test_resume_selection_skips_corrupt_checkpoints(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    one, two, three = (_save(root, s) for s in (1, 2, 3))
    _zero_middle(two / ck.WEIGHTS)
    _zero_middle(three / ck.WEIGHTS)
    assert ck.newest_intact(root, main=False) == one  # other ranks: same choice, nothing moved
    assert capsys.readouterr().err == "" and ck.list_checkpoints(root) == [one, two, three]
    assert ck.newest_intact(root) == one
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(ln.startswith("warning: ") and f"resuming from {one}" in ln for ln in err)
    assert str(three / ck.WEIGHTS) in err[0] and str(two / ck.WEIGHTS) in err[1]
    # set aside, so pruning never keeps them over the resumed run's new checkpoints
    assert ck.list_checkpoints(root) == [one]
    assert sorted(p.name for p in root.glob(ck.CORRUPT + "*")) == ["corrupt-step_0000002", "corrupt-step_0000003"]
    # none verifies: the newest one's error, nothing moved (the run does not silently restart)
    _zero_middle(one / ck.WEIGHTS)
    with pytest.raises(UserError, match=str(one / ck.WEIGHTS)):
        ck.newest_intact(root)
    assert ck.list_checkpoints(root) == [one]


def test_added_file_is_recorded_and_verified(tmp_path):
    c = _save(tmp_path / "checkpoints", 1)
    ck.add_file(c, "adapter.safetensors", {"a": torch.arange(4096.0)}, {"format": "test"})
    assert set(json.loads((c / ck.META).read_text())[ck.FILES]) == {ck.WEIGHTS, ck.STATE, "adapter.safetensors"}
    ck.verify(c)
    _zero_middle(c / "adapter.safetensors")
    with pytest.raises(UserError, match="adapter.safetensors is corrupt"):
        ck.verify(c)


def test_every_checkpoint_file_has_the_default_mode(tmp_path):
    old = os.umask(0o027)  # not the usual 022: the mode follows the umask, it is not hard-coded
    files.file_mode.cache_clear()
    try:
        c = _save(tmp_path / "checkpoints", 1)
        ck.add_file(c, "adapter.safetensors", {"a": torch.ones(2)}, {})
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in c.iterdir()}
    finally:
        os.umask(old)
        files.file_mode.cache_clear()
    want = oct(0o640)
    assert modes == {ck.WEIGHTS: want, ck.STATE: want, ck.META: want, "adapter.safetensors": want}


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_in_a_checkpoint_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good = _save(root, 1)
    monkeypatch.setattr(torch, "save", _enospc)  # the training state hits the full disk
    with pytest.raises(UserError) as e:
        _save(root, 2)
    msg = str(e.value)
    needed = 64 * 64 * 4 + 64 * 4 + 8 * 4  # weights + the state's tensors
    assert f"no space left on device writing {root / 'step_0000002'}" in msg and f"{needed:,} bytes" in msg
    assert sorted(p.name for p in root.iterdir()) == [good.name]  # the torn save is gone
    ck.verify(good)
    assert ck.load_weights(good).keys() == {"weight", "bias"}
    # writers that hide the errno: safetensors' own message (as seen on a full tmpfs), and
    # torch.save's bare RuntimeError, which counts as a full disk only when little space is left
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert files.is_disk_full(full, free=10**12, needed=1)
    assert files.is_disk_full(RuntimeError("unexpected pos 576 vs 534"), free=0, needed=100)
    assert not files.is_disk_full(RuntimeError("unexpected pos 576 vs 534"), free=10**12, needed=100)


def test_full_disk_in_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "config.yaml"
    files.atomic_write(f, "old\n")
    monkeypatch.setattr(files.os, "fsync", _enospc)
    with pytest.raises(UserError, match=f"no space left on device writing {f}: it needs 8 bytes"):
        files.atomic_write(f, "new new\n")
    assert f.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ---------------------------------------------------------------------------- the real CLI
def test_corrupt_weights_refused_by_every_loader(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run, ignore=shutil.ignore_patterns("best_checkpoint"))
    newest = ck.list_checkpoints(run / "checkpoints")[-1]
    _zero_middle(newest / ck.WEIGHTS)
    # evaluate, generate, export and finetune all load through checkpoints.load
    with pytest.raises(UserError, match=f"{newest / ck.WEIGHTS} is corrupt"):
        checkpoints.load(run)
    proc = run_cli("evaluate", f"checkpoint={run}", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'ev'}")
    assert_user_error(proc, str(newest / ck.WEIGHTS))
    assert not (tmp_path / "ev" / "eval.json").exists()


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("pretrain", *BASE, "trainer.max_steps=4", "trainer.ckpt_every=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = run / "checkpoints" / "step_0000004"
    _zero_middle(bad / ck.WEIGHTS)
    proc = run_cli(
        "pretrain", *BASE, "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.resume=auto", f"hydra.run.dir={run}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and str(bad / ck.WEIGHTS) in warnings[0], proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr and "step_0000002 at step 2" in proc.stdout + proc.stderr
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == [f"step_000000{s}" for s in (2, 4, 6)]
    for c in ck.list_checkpoints(run / "checkpoints"):
        ck.verify(c)
    assert (run / "checkpoints" / "corrupt-step_0000004").is_dir()  # kept for inspection


def test_full_disk_during_training_is_one_line_and_the_last_checkpoint_loads(tmp_path):
    """The second save hits ENOSPC (injected into torch.save in the real CLI process)."""
    run = tmp_path / "run"
    inject = (
        "import errno, sys, torch\n"
        "real, calls = torch.save, []\n"
        "def save(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(*a, **k)\n"
        "torch.save = save\n"
        "from llmtrain.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", inject, "pretrain", *BASE, "trainer.max_steps=4", "trainer.ckpt_every=2"]
        + [f"hydra.run.dir={run}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert_user_error(proc, f"no space left on device writing {run / 'checkpoints' / 'step_0000004'}", "bytes")
    good = run / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [good.name]
    assert checkpoints.load(good).meta["step"] == 2


def test_kill_9_inside_a_save_keeps_the_previous_checkpoint_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    args = [*BASE, "trainer.max_steps=8", "trainer.ckpt_every=4", f"hydra.run.dir={run}"]
    env = {**os.environ, "WANDB_MODE": "disabled", ck.SAVE_DELAY_ENV: "8:120"}  # step 8's save stalls
    p = subprocess.Popen(
        [sys.executable, "-m", "llmtrain", "pretrain", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.time()
    while not list((run / "checkpoints").glob(".tmp-step_0000008-*/model.safetensors")):
        assert p.poll() is None and time.time() - t0 < 120, "the run never reached the save"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # weights written, the rest not, not renamed
    p.wait()
    prev = run / "checkpoints" / "step_0000004"
    assert ck.list_checkpoints(run / "checkpoints") == [prev]
    ck.verify(prev)
    assert checkpoints.load(run).meta["step"] == 4
    proc = run_cli("pretrain", *args, "trainer.resume=auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step_0000004 at step 4" in proc.stdout + proc.stderr
    last = run / "checkpoints" / "step_0000008"
    ck.verify(last)
    assert json.loads((last / ck.META).read_text())["step"] == 8
