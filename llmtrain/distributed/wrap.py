"""Apply the parallelism strategy (and compile) to the loss module."""
from __future__ import annotations

import torch

from llmtrain.config.schema import TrainerConfig
from llmtrain.distributed.setup import DistInfo
from llmtrain.errors import UserError

STRATEGIES = ("auto", "single", "ddp", "fsdp")


def wrap_model(module: torch.nn.Module, tc: TrainerConfig, device: torch.device, precision: str,
               dist: DistInfo) -> torch.nn.Module:
    if tc.strategy not in STRATEGIES:
        raise UserError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {tc.strategy!r}")
    module.to(device)
    strategy = tc.strategy
    if strategy == "auto":
        strategy = "ddp" if dist.enabled else "single"
    if strategy in ("ddp", "fsdp") and not dist.enabled:
        strategy = "single"  # one process: nothing to shard or synchronise
    if strategy == "single" and dist.enabled:
        raise UserError("trainer.strategy=single with several processes; use ddp or fsdp")
    if tc.compile:
        module.model = torch.compile(module.model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        module = DDP(module, device_ids=ids)
    elif strategy == "fsdp":
        raise UserError("trainer.strategy=fsdp is not available yet")
    return module
