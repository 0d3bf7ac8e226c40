"""The job's runtime: run directory, device, precision, process group and seeds, and what
Hydra says about the job (its output directory and command-line overrides)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmtrain.config.schema import RunConfig
from llmtrain.distributed import DistInfo, broadcast_str, init_distributed
from llmtrain.threads import apply_threads
from llmtrain.train.device import pick_device, pick_precision


@dataclass
class Runtime:
    run_dir: Path
    device: torch.device
    precision: str
    dist: DistInfo
    threads: int = 1  # CPU threads of torch ops (llmtrain/threads.py)

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def hydra_run_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra (tests, scripts)
        return Path.cwd()


def hydra_overrides() -> list[str]:
    """The command-line overrides of this job (for sweep summaries and plot legends)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def setup_runtime(cfg: RunConfig, run_dir: Path | None = None) -> Runtime:
    threads = apply_threads(cfg.trainer.threads)  # before any torch work
    device = pick_device(cfg.trainer.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device.type)
    # Every rank must use rank 0's run directory (Hydra's ${now:} differs between processes).
    run_dir = Path(broadcast_str(str(run_dir or hydra_run_dir())))
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    precision = pick_precision(cfg.trainer.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.trainer.seed + dist.rank)
    return Runtime(run_dir=run_dir, device=device, precision=precision, dist=dist, threads=threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
