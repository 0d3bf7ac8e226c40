"""`llmtrain <verb> trainer.devices=N`: start N local worker processes through torch's elastic
launcher (what `torchrun --standalone --nproc-per-node N` does), so one command uses every GPU.

The parent's composed config (llmtrain/config/compose.py) is handed to the workers in a file, with
the run directory resolved once (Hydra's `${now:}` differs between processes), so the workers
neither compose again nor disagree about it. Only local rank 0 prints to the console; the other
ranks' output goes to log files (shown if a worker fails). Under an external launcher (torchrun,
SLURM srun), WORLD_SIZE is set and nothing is launched here: every rank composes its own config
and the other ranks take rank 0's run directory (llmtrain/cli.py, llmtrain/runtime.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path

from llmtrain.errors import fail

MULTIRUN_FLAGS = ("-m", "--multirun")


def maybe_launch(stage: str, cfg) -> bool:
    """Start trainer.devices workers on the composed config `cfg` and wait for them; False when
    this process should just run (one device, or already a worker of an external launcher)."""
    from llmtrain.config.compose import COMPOSED_ENV, save_composed

    if "WORLD_SIZE" in os.environ or "trainer" not in cfg:
        return False
    devices = int(cfg.trainer.devices)
    if devices <= 1:
        return False
    import torch

    if torch.cuda.is_available() and str(cfg.trainer.device) != "cpu" and devices > torch.cuda.device_count():
        fail(f"trainer.devices={devices} but only {torch.cuda.device_count()} CUDA devices are visible")
    # Resolve ${now:} once: every worker must write to this one directory.
    cfg.hydra.run.dir = os.path.abspath(str(cfg.hydra.run.dir))
    tmp = tempfile.mkdtemp(prefix="llmtrain-composed-")
    path = os.path.join(tmp, "config.yaml")
    save_composed(cfg, Path(path))
    os.environ[COMPOSED_ENV] = path
    try:
        code = launch_local(devices, ["-u", "-m", "llmtrain", *stage.split()])
    finally:
        os.environ.pop(COMPOSED_ENV, None)
        shutil.rmtree(tmp, ignore_errors=True)
    if code:
        raise SystemExit(code)
    return True


def launch_local(nproc: int, cmd_args: list[str]) -> int:
    """Run `python <cmd_args>` as nproc ranks of one job on this machine; the exit code."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Each worker gets its share of the cores (torchrun would set 1 and warn).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The agent logs failures as multi-line reports; we report one line ourselves.
    quiet = logging.getLogger("torch.distributed.elastic")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    log_dir = tempfile.mkdtemp(prefix="llmtrain-workers-")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        logs_specs=DefaultLogsSpecs(
            log_dir=log_dir, redirects={r: Std.ALL for r in range(1, nproc)}, local_ranks_filter={0}
        ),
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)(*cmd_args)
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        if any(rank == 0 and f.exitcode == 2 for rank, f in failures):
            return 2  # rank 0 has printed the one-line error already
        # Workers signalled directly (not through this launcher) saved and said so: pass on their
        # interrupted exit code (143 SIGTERM, 130 SIGINT) without an error line.
        codes = {f.exitcode for _, f in failures}
        if len(codes) == 1 and codes <= {128 + signal.SIGTERM, 128 + signal.SIGINT}:
            return codes.pop()
        rank, f = failures[0]
        print(
            f"error: worker rank {rank} exited with code {f.exitcode}; worker logs in {log_dir}",
            file=sys.stderr,
            flush=True,
        )
        return f.exitcode if f.exitcode > 0 else 1
    except SignalException as e:
        # The agent has forwarded the signal to the workers and waited for them: they stopped at
        # the step boundary and saved a checkpoint (rank 0 said so above). Exit like a signalled
        # process would, so schedulers see the job was stopped.
        print(
            f"launcher stopped by {signal.Signals(e.sigval).name}; worker logs in {log_dir}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(e.sigval)
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0
