"""`llmtrain <verb> trainer.devices=N`: start N local worker processes through torch's elastic
launcher (what `torchrun --standalone --nproc-per-node N` does), so one command uses every GPU.

The parent composes the config once to read `trainer.devices` (which an experiment may set) and
to resolve the run directory: Hydra's `${now:}` differs between processes, so every worker gets
the same `hydra.run.dir=<dir>`. Only local rank 0 prints to the console; the other ranks' output
goes to log files (shown if a worker fails). Under an external launcher (torchrun, SLURM srun),
WORLD_SIZE is set and nothing is launched here; see `worker_args` for what non-zero ranks change.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import uuid

from llmtrain.errors import fail

MULTIRUN_FLAGS = ("-m", "--multirun")


def _hydra_quote(value: str) -> str:
    if re.fullmatch(r"[\w./\-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _has_override(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.config import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def worker_args(args: list[str], overrides: list[str]) -> list[str]:
    """Under torchrun, ranks other than 0 must not create their own `${now:}` run directory or
    Hydra log file: they run in `.` (nothing is written there) and take rank 0's directory by
    broadcast (stages/common.py setup_runtime)."""
    if os.environ.get("RANK", "0") == "0":
        return args
    extra = ["hydra/job_logging=disabled"]
    if not _has_override(overrides, "hydra.run.dir"):
        extra.append("hydra.run.dir=.")
    return [*args, *extra]


def maybe_launch(stage: str, args: list[str], flags: list[str], overrides: list[str], config_name: str) -> bool:
    """Start trainer.devices workers and wait for them; False when this process should just run."""
    if "WORLD_SIZE" in os.environ or any(f in flags for f in MULTIRUN_FLAGS):
        return False
    if not any(o.split("=", 1)[0].lstrip("+~").startswith(("trainer", "experiment")) for o in overrides):
        return False  # the primary configs use one device; only an override can ask for more
    cfg = _compose(config_name, [o for o in overrides if not o.startswith("hydra")] +
                   [o for o in overrides if o.startswith("hydra.run.dir=")])
    devices = int(cfg.trainer.devices) if "trainer" in cfg else 1
    if devices <= 1:
        if devices < 1:
            fail(f"trainer.devices must be >= 1, got {devices}")
        return False
    import torch

    if torch.cuda.is_available() and str(cfg.trainer.device) != "cpu" and devices > torch.cuda.device_count():
        fail(f"trainer.devices={devices} but only {torch.cuda.device_count()} CUDA devices are visible")
    run_dir = os.path.abspath(str(cfg.hydra.run.dir))
    worker = [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={_hydra_quote(run_dir)}"]
    code = launch_local(devices, ["-u", "-m", "llmtrain", *stage.split(), *worker])
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
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects={r: Std.ALL for r in range(1, nproc)},
                                    local_ranks_filter={0}),
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)(*cmd_args)
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        if any(rank == 0 and f.exitcode == 2 for rank, f in failures):
            return 2  # rank 0 has printed the one-line error already
        rank, f = failures[0]
        print(f"error: worker rank {rank} exited with code {f.exitcode}; worker logs in {log_dir}",
              file=sys.stderr, flush=True)
        return f.exitcode if f.exitcode > 0 else 1
    except SignalException as e:
        # The agent has forwarded the signal to the workers and waited for them: they stopped at
        # the step boundary and saved a checkpoint (rank 0 said so above). Exit like a signalled
        # process would, so schedulers see the job was stopped.
        print(f"launcher stopped by {signal.Signals(e.sigval).name}; worker logs in {log_dir}",
              file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0

