"""Optimizers (AdamW; Muon for hidden matrices with AdamW for the rest) with decoupled weight
decay only on matrices, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from llmtrain.config.schema import OptimConfig, SchedulerConfig
from llmtrain.errors import UserError


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # Norm weights and biases are vectors; embeddings are matrices but are not decayed.
    return p.ndim < 2 or "emb" in name or name.endswith(("wte.weight", "wpe.weight"))


OPTIMIZERS = ("adamw", "muon")


def check_optimizer(cfg: OptimConfig, sharded: bool) -> None:
    """The optimizer exists and suits the parameters (`sharded`: FSDP splits the matrices)."""
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"unknown optim.name {cfg.name!r}; available: {', '.join(OPTIMIZERS)}")
    if cfg.name == "muon" and sharded:
        raise UserError(
            "optim=muon orthogonalises whole weight matrices, which FSDP shards: "
            "use trainer.strategy=ddp (or optim=adamw)"
        )


def adamw_fused(cfg: OptimConfig, device_type: str) -> bool:
    """Whether AdamW runs torch's fused kernel: optim.fused, or fused_by_default when unset."""
    return cfg.fused if cfg.fused is not None else fused_by_default(device_type)


def fused_by_default(device_type: str) -> bool:
    """optim.fused unset: torch's fused AdamW kernel on CUDA, and on CPU where torch has it (2.4+):
    there it was 4.5x faster than foreach for gpt2_124m's parameters and needs no temporary the
    size of a parameter group (docs/benchmarks.md, issue 21)."""
    return device_type == "cuda" or (device_type == "cpu" and torch.__version__ >= "2.4")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    check_optimizer(cfg, sharded=any(hasattr(p, "full_tensor") for p in model.parameters()))
    decay, no_decay, hidden, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if cfg.name == "muon" and p.ndim == 2 and "blocks." in name:
            hidden.append(p)
        else:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "muon":
        groups.append({"params": hidden, "weight_decay": cfg.weight_decay, "lr": cfg.muon_lr, "muon": True})
        return MuonAdamW(
            [g for g in groups if g["params"]],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            momentum=cfg.muon_momentum,
            ns_steps=cfg.muon_ns_steps,
        )
    fused = adamw_fused(cfg, device_type)
    # foreach batches the update over all tensors, but makes a model-sized temporary (sqrt of the
    # second moment) and more passes over memory: the fused kernel does one pass and no temporary
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton-Schulz iteration towards the nearest semi-orthogonal matrix U V^T of g = U S V^T
    (Muon's quintic, coefficients from Keller Jordan's modded-nanoGPT); in bf16 on CUDA."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    return (x.mT if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon (SGD momentum, then orthogonalised: every direction of the update gets the same
    size) on the groups marked "muon" (the blocks' weight matrices); AdamW on the others
    (embeddings, output head, norms, biases), whose shapes Muon does not suit.

    A step is skipped on the device when `found_inf` (a 0/1 tensor) is set before step(), as the
    fused AdamW kernel does: no host sync. State is plain per-parameter tensors, so checkpoints
    and distributed state dicts treat it like any torch optimizer.
    """

    skips_on_found_inf = True

    def __init__(
        self, groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5
    ):
        super().__init__(
            groups,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=0.0,
                momentum=momentum,
                ns_steps=ns_steps,
                muon=False,
                fused=False,
            ),
        )
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        keep = None  # 1, or 0 to skip the step: one tensor for the whole step
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if keep is None:
                    keep = (
                        torch.ones((), device=p.device) if self.found_inf is None else 1 - self.found_inf.to(p.device)
                    )
                grad = torch.where(keep > 0, p.grad, 0)  # a skipped step must not poison the state
                lr, state = group["lr"], self.state[p]
                p.mul_(1 - lr * group["weight_decay"] * keep)
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(grad, (1 - group["momentum"]) * keep)
                    update = orthogonalize(grad.lerp(buf, group["momentum"]), group["ns_steps"])  # Nesterov
                    # Same RMS update size for wide and tall matrices.
                    p.sub_(update * (lr * max(1.0, p.size(0) / p.size(1)) ** 0.5 * keep))
                else:
                    if not state:
                        state["step"] = torch.zeros((), device=p.device)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    b1, b2 = group["betas"]
                    state["step"].add_(keep)
                    state["exp_avg"].lerp_(grad, (1 - b1) * keep)
                    state["exp_avg_sq"].mul_(1 - (1 - b2) * keep).addcmul_(grad, grad, value=1 - b2)
                    step = state["step"].clamp(min=1)
                    denom = (state["exp_avg_sq"].sqrt() / (1 - b2**step).sqrt()).add_(group["eps"])
                    p.addcdiv_(state["exp_avg"] * (-lr / (1 - b1**step) * keep), denom)
        return loss


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
