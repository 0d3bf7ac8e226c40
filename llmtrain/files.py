"""Durable file writes: every file the tool writes goes through `atomic_write`.

Written under a temporary name in the same directory, fsynced, renamed over the target, and the
directory fsynced after the rename, so a crash or kill leaves either the old file or the new
one, never a torn one. Imports nothing heavy: the sweep's parent process uses it too.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text as UTF-8) atomically and durably."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
