"""Hydra callback registered in conf/common.yaml (hydra.callbacks.sweep_summary).

- on_multirun_start: fail early, with one line, when the chosen launcher or study storage cannot work.
- on_job_start: drop a status left in a reused job directory by an earlier sweep.
- on_job_end: record a job whose exception escaped the task function (the CLI's catches them).
- on_multirun_end: print the summary table and write summary.csv / summary.md in the sweep dir.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llmtrain.sweep.job import ERROR_FILE, STATUS_FILE


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _major(dist: str) -> int | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version(dist).split(".")[0])
    except (PackageNotFoundError, ValueError):
        return None


class SweepSummary(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        target = str(config.hydra.launcher.get("_target_", ""))
        if (
            "hydra_submitit_launcher" in target
            and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None
        ):
            _exit("hydra/launcher=slurm needs the submitit launcher: pip install hydra-submitit-launcher")
        if config.hydra.sweeper.get("storage") and (_major("optuna") or 0) < 3 and (_major("sqlalchemy") or 0) >= 2:
            # optuna 2.x (the version hydra-optuna-sweeper 1.x allows) cannot open RDB storage with SQLAlchemy 2.
            _exit(
                "hydra.sweeper.storage with optuna 2.x needs SQLAlchemy 1.x: pip install 'sqlalchemy<2' 'alembic<1.14'"
            )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        for name in (STATUS_FILE, ERROR_FILE):
            (job_dir / name).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status != JobStatus.FAILED or (job_dir / STATUS_FILE).exists():
            return
        import json

        from llmtrain.files import atomic_write
        from llmtrain.sweep.job import error_line

        exc = job_return._return_value  # the exception (reading .return_value would re-raise it)
        record = {
            "job_num": config.hydra.job.get("num"),
            "overrides": list(config.hydra.overrides.task),
            "status": "failed",
            "value": None,
            "error": error_line(exc),
            "finished_at": time.time(),
        }
        job_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(job_dir / STATUS_FILE, json.dumps(record, indent=2, default=str) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from llmtrain.sweep.job import direction
        from llmtrain.sweep.summary import SUMMARY_CSV, SUMMARY_MD, write_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        metric = str(config.get("optimize_metric") or "val/loss")
        # A second early from the start: file times and our clock may round differently.
        since = self.started - 1.0 if self.started is not None else None
        summary = write_summary(sweep_dir, metric, direction(metric, config.hydra), since=since)
        if summary is not None:
            print("\n" + summary.text() + f"\nwrote {sweep_dir / SUMMARY_CSV} and {sweep_dir / SUMMARY_MD}", flush=True)
