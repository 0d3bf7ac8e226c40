"""How many CPU threads a job's torch ops use (`trainer.threads`, 0 = auto).

torch starts one thread per core, so jobs side by side on one machine (a joblib sweep, the
ranks of `trainer.devices=N` or torchrun, evaluation ranks) each take every core and slow each
other down many times over. Auto divides the cores this process may use by the local
processes of the run. An OMP_NUM_THREADS the user set wins over auto; the one joblib and our
local launcher set for their workers does not, so the CLI remembers the user's value before
anything is launched (`remember_user_threads`). Under an external torchrun the value torchrun
sets counts as the user's.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

# The user's OMP_NUM_THREADS ("" = unset), recorded by the first llmtrain process of a run.
USER_THREADS_ENV = "LLMTRAIN_USER_OMP_NUM_THREADS"


def remember_user_threads() -> None:
    os.environ.setdefault(USER_THREADS_ENV, os.environ.get("OMP_NUM_THREADS", ""))


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def joblib_jobs() -> int:
    """Jobs a joblib sweep runs side by side (hydra.launcher.n_jobs; negative as joblib reads
    it: -1 = all CPUs), or 1 outside such a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # outside Hydra (tests, scripts)
        return 1
    launcher = hc.get("launcher") or {}
    if hc.mode != RunMode.MULTIRUN or "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


def local_processes() -> int:
    """Processes of this run on this machine: ranks (LOCAL_WORLD_SIZE) times parallel sweep jobs."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or 1) * joblib_jobs()


def resolve_threads(requested: int, user_omp: str, cores: int, processes: int) -> tuple[int, str]:
    """(threads, why): trainer.threads if set, else the user's OMP_NUM_THREADS, else cores / processes."""
    if requested > 0:
        return requested, "trainer.threads"
    if user_omp.strip().isdigit() and int(user_omp) > 0:
        return int(user_omp), "OMP_NUM_THREADS"
    return max(1, cores // max(1, processes)), f"auto: {cores} cores / {processes} processes"


def apply_threads(requested: int) -> int:
    """Set torch's intra-op thread count for this job; returns it."""
    import torch

    user = os.environ.get(USER_THREADS_ENV, os.environ.get("OMP_NUM_THREADS", ""))
    threads, _ = resolve_threads(requested, user, usable_cores(), local_processes())
    torch.set_num_threads(threads)
    return threads


def other_runnable() -> int | None:
    """Threads of other processes running or ready to run right now: the kernel's run queue
    (/proc/loadavg) less this process's own runnable threads. None where /proc cannot tell."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    stat = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            own += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


def decoding_threads(current: int, looks: int = 3) -> int:
    """torch threads for generation's decoding steps: `current`, less the cores other processes
    keep busy (the fewest of a few looks a millisecond apart, so a passing process does not
    count). A decoding step is a chain of small ops; each parallel region waits for every
    thread, and a thread that shares its core with a busy process makes each wait a time slice
    (124M, batch 1, one busy neighbour: 96 ms a step with 2 threads against ~45 ms with 1)."""
    if current <= 1:
        return current
    busy = None
    for i in range(looks):
        n = other_runnable()
        if n is None:
            return current
        busy = n if busy is None else min(busy, n)
        if busy == 0:
            break
        if i + 1 < looks:
            time.sleep(0.001)
    return max(1, min(current, usable_cores() - busy))


@contextmanager
def threads_for_decoding() -> Iterator[None]:
    """torch runs with decoding_threads(its thread count) threads inside the block."""
    import torch

    current = torch.get_num_threads()
    fewer = decoding_threads(current)
    if fewer != current:
        torch.set_num_threads(fewer)
    try:
        yield
    finally:
        if fewer != current:
            torch.set_num_threads(current)
