"""Durable file writes: every file the tool writes goes through `atomic_write`.

Written under a temporary name in the same directory, fsynced, renamed over the target, and the
directory fsynced after the rename, so a crash or kill leaves either the old file or the new
one, never a torn one. A full disk is one line naming the file and the bytes it needs
(`disk_full`), and nothing already there is touched. Imports nothing heavy: the sweep's parent
process uses it too.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import shutil
from pathlib import Path

from llmtrain.errors import UserError

TMP_MARK = ".tmp-"  # temporary names: .<name>.tmp-<pid>


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new entry) in directory `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a filesystem that does not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """The mode a plain open() gives a new file here (0o666 less the umask). Writers that create
    files through a private temporary file (safetensors does, with 0600) are set back to it."""
    try:  # Linux: read the umask without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as f:
            umask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in chunks: memory stays flat."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _errnos(e: BaseException) -> set[int]:
    seen: set[int] = set()
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            seen.add(e.errno)
        e = e.__cause__ or e.__context__
    return seen


def is_disk_full(e: BaseException, free: int, needed: int) -> bool:
    """Did this write fail because the filesystem is full? By errno where there is one; writers
    that hide it (safetensors: "os error 28", torch.save: a bare RuntimeError) by their message
    or by the space `free` at the failure (before cleaning up) being below what the write needs."""
    if _errnos(e) & {errno.ENOSPC, errno.EDQUOT}:
        return True
    if not isinstance(e, Exception) or isinstance(e, (KeyboardInterrupt, SystemExit)):
        return False
    text = str(e)
    if "os error 28" in text or "No space left" in text:
        return True
    return 0 <= free < needed


def free_bytes(where: Path) -> int:
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return -1


def disk_full(path: Path, needed: int, free: int) -> UserError:
    free_txt = f", {free:,} free" if free >= 0 else ""
    return UserError(
        f"no space left on device writing {path}: it needs {needed:,} bytes{free_txt}; "
        "nothing already written was changed"
    )


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text as UTF-8) atomically and durably."""
    path = Path(path)
    tmp = tmp_name(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        free = free_bytes(path.parent)
        tmp.unlink(missing_ok=True)
        if is_disk_full(e, free, len(raw)):
            raise disk_full(path, len(raw), free) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_replace(tmp: Path, path: Path) -> None:
    """Move a finished temporary file (or directory) `tmp` over `path`, durably."""
    if tmp.is_file():
        fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory` and the directories themselves: a directory that is
    about to be renamed into place must be complete on disk first."""
    directory = Path(directory)
    for p in sorted(directory.rglob("*"), reverse=True):
        if p.is_file():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(directory)
