"""Where metrics go: metrics.jsonl in the run directory always, plus an optional tracker
(wandb, tensorboard). Names are wandb-style (`train/loss`, `val/loss`) everywhere."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmtrain.config.schema import LoggerConfig
from llmtrain.errors import UserError


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends one JSON object per event to metrics.jsonl; forwards to a tracker if configured.

    Only the process that owns the run directory (rank 0) should create one with enabled=True.
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: dict | None = None,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._backend = _make_backend(cfg, run_dir, config_dict) if enabled else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._backend is not None:
            self._backend.log(metrics, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None


class _WandbBackend:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config_dict: dict | None):
        try:
            import wandb
        except ImportError:
            raise UserError("logger=wandb needs the wandb package: pip install wandb") from None
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project, name=cfg.run_name, group=cfg.group, tags=list(cfg.tags) or None,
            mode=cfg.mode, dir=str(run_dir), config=config_dict, reinit=True,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoardBackend:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


def _make_backend(cfg: LoggerConfig, run_dir: Path, config_dict: dict | None):
    if cfg.name == "console":
        return None
    if cfg.name == "wandb":
        return _WandbBackend(cfg, run_dir, config_dict)
    if cfg.name == "tensorboard":
        return _TensorBoardBackend(run_dir)
    raise UserError(f"unknown logger.name {cfg.name!r}; available: console, tensorboard, wandb")
