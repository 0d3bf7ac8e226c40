"""The run directory of a training stage (pretrain, finetune): one process at a time, a fresh run
never mixed with an earlier one, and what interrupted runs left behind tidied at the next start.

    with claim(cfg, rt) as run_dir:   # the lock; a bad trainer.resume, a fresh run over checkpoints
        ...                           # every other check that can fail (data, model, resume checkpoint)
        run_dir.begin(resumed_step)   # the first writes: overwrite clears, metrics.jsonl reconciled

The lock is an flock(2) on RUN_DIR/.lock, held by rank 0 for the whole run. The kernel drops it
when the process ends, however it ends, so the lock of a killed run is simply taken over by the
next start; the file only names the holder (PID, host) for the message a second process prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llmtrain.config.schema import RunConfig
from llmtrain.distributed import broadcast_str
from llmtrain.errors import UserError
from llmtrain.files import TMP_MARK, fsync_dir
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.tracking import METRICS_FILE, reconcile_metrics

if TYPE_CHECKING:
    from llmtrain.runtime import Runtime

LOCK = ".lock"
CHECKPOINTS = "checkpoints"
OLD_MARK = ".old-"  # save_checkpoint moves a re-saved step aside as .old-step_N-<pid>
# What a training run writes into its directory: all that trainer.overwrite=true removes (the
# directory may be a folder that holds other things too).
RUN_OUTPUTS = (
    CHECKPOINTS,
    ckpt.BEST,
    METRICS_FILE,
    "config.yaml",
    "overrides.yaml",
    "run_info.json",
    ".hydra",
    "reference_logps.safetensors",  # task=preference's cache of the reference log-probs
    "curves.png",
    "wandb",
    "tensorboard",
)
# flock(2) errors that mean "this filesystem has no locks", not "someone holds it".
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """Exclusive use of a run directory by this process."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        path = run_dir / LOCK
        try:
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise UserError(_in_use(run_dir, path)) from None
                except OSError as e:
                    os.close(fd)
                    if e.errno not in NO_FLOCK:
                        raise
                    return cls._acquire_by_pid(run_dir, path)
                # The holder may have released (unlinked) the file between our open and flock:
                # then we locked a file nobody else will look at; start over on the new one.
                if _same_file(fd, path):
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, _holder_line().encode())
        except OSError as e:
            raise UserError(f"cannot lock run directory {run_dir} ({path}): {e.strerror or e}") from None
        return cls(path, fd)

    @classmethod
    def _acquire_by_pid(cls, run_dir: Path, path: Path) -> RunLock:
        """Without flock (some network filesystems): the PID in the file decides; one that is gone
        (a crashed run) is taken over."""
        pid, host = _read_holder(path, wait=False)
        if pid is not None and pid != os.getpid() and (host != socket.gethostname() or pid_alive(pid)):
            raise UserError(_in_use(run_dir, path))
        path.write_text(_holder_line())
        return cls(path, None)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self._fd is None or _same_file(self._fd, self.path):
                self.path.unlink()  # while still locked: a waiting opener then sees another file
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RunDir:
    """A claimed run directory (see the module docstring); rank 0 holds the lock, every rank
    gets one of these so the stages read the same on every rank."""

    def __init__(self, path: Path, cfg: RunConfig, lock: RunLock | None):
        self.path, self.cfg, self.lock = path, cfg, lock

    def begin(self, resumed_step: int | None) -> None:
        """The run goes ahead: from here on it may write. `resumed_step`: the step of the
        checkpoint it continues from, None when it starts from scratch."""
        if self.lock is None:  # not rank 0
            return
        if self.cfg.trainer.overwrite:
            for name in RUN_OUTPUTS:
                p = self.path / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
            log = self.path / f"{self.cfg.stage}.log"  # open (appending) in this run: emptied, not removed
            if log.is_file():
                os.truncate(log, 0)
        reconcile_metrics(self.path / METRICS_FILE, resumed_step)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(cfg: RunConfig, rt: Runtime) -> RunDir:
    """Lock rt.run_dir and check that this run may use it. Collective: rank 0 decides, every rank
    raises on a refusal, and only rank 0 prints it (the others exit 2 quietly)."""
    lock, error = None, None
    if rt.is_main:
        try:
            lock = _claim(cfg, rt.run_dir)
        except UserError as e:
            error = str(e)
    error = broadcast_str(error)
    if error is not None:
        if rt.is_main:
            raise UserError(error)
        raise SystemExit(2)
    return RunDir(rt.run_dir, cfg, lock)


def _claim(cfg: RunConfig, run_dir: Path) -> RunLock:
    tc = cfg.trainer
    if tc.resume not in ("never", "auto"):
        raise UserError(f"trainer.resume must be 'never' or 'auto', got {tc.resume!r}")
    if tc.overwrite and tc.resume == "auto":
        raise UserError(
            "trainer.overwrite=true and trainer.resume=auto exclude each other "
            "(overwrite clears the checkpoints a resume would continue from)"
        )
    lock = RunLock.acquire(run_dir)
    try:
        if tc.resume == "never" and not tc.overwrite and (found := saved_checkpoints(run_dir)):
            raise UserError(
                f"run directory {run_dir} already holds checkpoints ({found[-1].name}); continue that run "
                f"with trainer.resume=auto, start a new one with another hydra.run.dir, or clear it "
                f"with trainer.overwrite=true"
            )
        # Only dead processes' leftovers, and a checkpoint back in place: nothing the run could
        # still need is removed, so this may precede the checks of the resume checkpoint.
        clean_leftovers(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def saved_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in the run directory, including one a killed re-save left aside."""
    root = run_dir / CHECKPOINTS
    aside = [p for p in root.glob(f"{OLD_MARK}step_*") if _complete(p)] if root.is_dir() else []
    return ckpt.list_checkpoints(root) + aside


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what interrupted saves and prunes left (the removed paths are returned):
    - `.tmp-*` files and directories of dead processes (atomic writes, checkpoint saves),
    - `.old-step_N-<pid>` of dead processes: put back as step_N when that is missing or
      incomplete (a kill between the two renames of a re-save), else deleted,
    - step_* directories without meta.json (a prune killed halfway; saves are renamed complete).
    Another live process's temporary files are never touched."""
    root = run_dir / CHECKPOINTS
    removed: list[Path] = []
    dirs = [run_dir, root, *sorted(root.glob("step_*"))] if root.is_dir() else [run_dir]
    for d in dirs:
        for p in sorted(d.iterdir()):
            if TMP_MARK in p.name and (pid := leftover_pid(p)) is not None and not pid_alive(pid):
                _remove(p)
                removed.append(p)
    if not root.is_dir():
        return removed
    for old in sorted(root.glob(f"{OLD_MARK}step_*")):
        if (pid := leftover_pid(old)) is None or pid_alive(pid):
            continue
        final = root / old.name[len(OLD_MARK) :].rsplit("-", 1)[0]
        if _complete(old) and not _complete(final):
            if final.exists():
                _remove(final)
            old.rename(final)
            fsync_dir(root)
        else:
            _remove(old)
            removed.append(old)
    for step_dir in sorted(root.glob("step_*")):
        if step_dir.is_dir() and not (step_dir / ckpt.META).is_file():
            _remove(step_dir)
            removed.append(step_dir)
    return removed


def leftover_pid(path: Path) -> int | None:
    """The writer's PID in a temporary name (`.<name>.tmp-<pid>`, `.tmp-step_N-<pid>`,
    `.old-step_N-<pid>`), None for any other name."""
    name = path.name
    if not name.startswith(".") or (TMP_MARK not in name and not name.startswith(OLD_MARK)):
        return None
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() and int(tail) > 0 else None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _complete(p: Path) -> bool:
    return (p / ckpt.META).is_file() and (p / ckpt.WEIGHTS).is_file()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder_line() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _read_holder(path: Path, wait: bool = True) -> tuple[int | None, str | None]:
    """(PID, host) from the lock file; the holder writes them just after locking, so wait a
    moment for an empty file to be filled."""
    for _ in range(20 if wait else 1):
        try:
            parts = path.read_text().split()
        except OSError:
            parts = []
        if parts and parts[0].isdigit():
            return int(parts[0]), (parts[1] if len(parts) > 1 else None)
        if wait:
            time.sleep(0.05)
    return None, None


def _in_use(run_dir: Path, path: Path) -> str:
    pid, host = _read_holder(path)
    who = f"process {pid}" if pid is not None else "another process"
    if host and host != socket.gethostname():
        who += f" on {host}"
    return (
        f"run directory {run_dir} is in use by {who} (lock {path}); wait for it to finish, "
        f"or choose another hydra.run.dir"
    )
