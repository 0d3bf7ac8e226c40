"""AdamW with decoupled weight decay only on matrices, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch

from llmtrain.config.schema import OptimConfig, SchedulerConfig
from llmtrain.errors import UserError


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # Norm weights and biases are vectors; embeddings are matrices but are not decayed.
    return p.ndim < 2 or "emb" in name or name.endswith(("wte.weight", "wpe.weight"))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    if cfg.name != "adamw":
        raise UserError(f"unknown optim.name {cfg.name!r}; available: adamw")
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    # foreach batches the update over all tensors: faster than a per-parameter loop on CPU too
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def lr_factor(step: int, max_steps: int, cfg: SchedulerConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based) for each schedule."""
    warm = min(cfg.warmup_steps, max_steps)
    if step < warm:
        return (step + 1) / warm
    floor = cfg.min_lr_ratio
    span = max(1, max_steps - warm)
    progress = min(1.0, (step - warm) / span)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    if cfg.name == "wsd":  # warmup, stable, then linear decay over the last decay_fraction
        decay_start = max_steps - int(cfg.decay_fraction * max_steps)
        if step < decay_start:
            return 1.0
        return floor + (1 - floor) * (1 - (step - decay_start) / max(1, max_steps - decay_start))
    raise UserError(f"unknown scheduler.name {cfg.name!r}; available: constant, cosine, linear, wsd")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_steps: int):
    lr_factor(0, max_steps, cfg)  # validates the name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, max_steps, cfg))
