"""What quantize and prune share: one process over one checkpoint, a working copy of its model
to compress while the source stays intact for the before/after report, and that report."""

from __future__ import annotations

import copy
import os

import torch

from llmtrain import checkpoints
from llmtrain.compress.report import compression_report
from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError

CPU = torch.device("cpu")


def check_one_shot(cfg: RunConfig, verb: str) -> None:
    if not cfg.checkpoint:
        raise UserError(f"{verb} needs checkpoint=PATH (a checkpoint or run directory)")
    if cfg.trainer.devices > 1 or os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError(f"{verb} runs in one process (trainer.devices={cfg.trainer.devices}; no torchrun)")


def load_source(cfg: RunConfig) -> tuple[checkpoints.Loaded, torch.nn.Module]:
    """The source checkpoint (read once) and a copy of its model to compress in place."""
    source = checkpoints.load(cfg.checkpoint, CPU)
    return source, copy.deepcopy(source.model)


def report_metric(cfg: RunConfig, source: checkpoints.Loaded, path, run_dir, enabled: bool) -> float | None:
    """The before/after report on the saved checkpoint as it loads; returns cfg.optimize_metric of it."""
    if not enabled:
        return None
    report = compression_report(source, checkpoints.load(path, CPU), cfg, run_dir)
    print(f"wrote {run_dir / 'compression.json'} and compression.md", flush=True)
    value = report["compressed"].get(cfg.optimize_metric)
    return float(value) if isinstance(value, (int, float)) else None
