"""Pruning the linear layers inside a model's blocks.

    magnitude   unstructured: the smallest |w| are zeroed, over all layers at once (global) or
                the same fraction in every layer (layer)
    2:4         semi-structured: in every group of 4 consecutive inputs of a row, the 2 smallest
    structured  whole attention heads (kv groups under GQA) and FFN channels go, by importance
                on calibration data: E[x_j^2] * ||W[:, j]||^2 summed over a unit's input columns
                of the output projection (the Wanda score); the model gets a smaller config

Unstructured and 2:4 pruning keep the shapes and put a `weight_mask` buffer (bool) on each
pruned layer: it is part of the state dict, so every checkpoint carries it, the loader puts it
back (`attach_from_state`), and `enforce` re-applies it after every optimizer step of a
recovery fine-tune, so pruned weights stay exactly zero whatever the optimizer does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from llmtrain.errors import UserError

MASK = "weight_mask"
METHODS = ("magnitude", "2:4", "structured")


def prunable(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the transformer blocks (not embeddings or task heads)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks." in n}


# ----------------------------------------------------------------------------- masks


def attach(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Register masks (module name -> bool tensor of the weight's shape) and zero what they drop."""
    for name, mask in masks.items():
        m = model.get_submodule(name)
        m.register_buffer(MASK, mask.to(device=m.weight.device, dtype=torch.bool))
    apply_masks(model)


def attach_from_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Masks stored in a checkpoint's weights (keys MODULE.weight_mask), registered on the model
    before the state is loaded; returns the masked module names."""
    suffix = "." + MASK
    names = [k[: -len(suffix)] for k in state if k.endswith(suffix)]
    for name in names:
        m = model.get_submodule(name)
        m.register_buffer(MASK, torch.ones_like(m.weight, dtype=torch.bool))
    return names


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: getattr(m, MASK) for n, m in model.named_modules() if isinstance(getattr(m, MASK, None), torch.Tensor)}


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    for n, mask in masks_of(model).items():
        weight = model.get_submodule(n).weight
        if hasattr(weight, "device_mesh"):  # FSDP: a sharded DTensor; the mask (a buffer) is whole
            weight.to_local().mul_(local_shard(mask, weight))
        else:
            weight.mul_(mask)


def local_shard(mask: torch.Tensor, weight) -> torch.Tensor:
    """This rank's part of a whole mask, cut as the DTensor `weight` is sharded (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None).to_local()


def is_mask_key(key: str) -> bool:
    return key.endswith("." + MASK)


@contextlib.contextmanager
def enforce(model: nn.Module):
    """While active, every optimizer step is followed by re-applying the model's masks (a global
    optimizer hook, so the trainer needs no change; a no-op for a model without masks)."""
    if not masks_of(model):
        yield
        return
    handle = register_optimizer_step_post_hook(lambda *_: apply_masks(model))
    try:
        apply_masks(model)
        yield
    finally:
        handle.remove()


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    layers = prunable(model)
    if scope == "layer":
        return {n: _keep_largest(m.weight.detach().abs(), sparsity) for n, m in layers.items()}
    flat = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    k = int(sparsity * flat.numel())
    if k == 0:
        return {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    threshold = flat.kthvalue(k).values
    return {n: m.weight.detach().abs() > threshold for n, m in layers.items()}


def _keep_largest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(sparsity * score.numel())
    mask = torch.ones_like(score, dtype=torch.bool).flatten()
    if k:
        mask[score.flatten().argsort()[:k]] = False
    return mask.view_as(score)


def semi_structured_masks(model: nn.Module, n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """n:m sparsity: in each group of m consecutive weights of a row, the n largest are kept."""
    out = {}
    for name, lin in prunable(model).items():
        w = lin.weight.detach().abs()
        if w.shape[1] % m:
            raise UserError(f"prune.method=2:4: {name} has {w.shape[1]} inputs, not a multiple of {m}")
        g = w.reshape(w.shape[0], -1, m)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(n, dim=-1).indices, True)
        out[name] = keep.reshape_as(w)
    return out


# ----------------------------------------------------------------------------- structured


@torch.no_grad()
def input_energy(model: nn.Module, run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """E[x_j^2] of the inputs of each block's output projections (attn.proj, mlp.proj), over
    the forward passes `run` makes."""
    sums: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "blocks." in name and name.endswith(("attn.proj", "mlp.proj")):

            def hook(mod, inp, out, name=name):
                x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
                acc = sums.setdefault(name, [torch.zeros(x.shape[1], device=x.device), 0])
                acc[0] += (x * x).sum(0)
                acc[1] += x.shape[0]

            hooks.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: s / max(c, 1) for n, (s, c) in sums.items()}


def _blocks(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if name.endswith("blocks") and isinstance(m, nn.ModuleList):
            for i, block in enumerate(m):
                yield f"{name}.{i}", block


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w)
    if b is not None:
        lin.bias.data.copy_(b)
    return lin


def structured_plan(
    model: nn.Module, energy: dict[str, torch.Tensor], fraction: float, heads: bool = True
) -> dict[str, dict]:
    """Per block: the kv groups (heads; all of them unless `heads`) and FFN channels to keep,
    the same number in every block so the smaller model still has one config."""
    plan = {}
    for name, block in _blocks(model):
        attn, mlp = block.attn, block.mlp
        hd, nh, nkv = attn.head_dim, attn.n_head, attn.n_kv_heads
        w_energy = attn.proj.weight.detach().float().pow(2).sum(0)  # ||W[:, j]||^2
        col = energy[f"{name}.attn.proj"] * w_energy
        head_score = col.reshape(nh, hd).sum(-1)
        group_score = head_score.reshape(nkv, nh // nkv).sum(-1)
        keep_groups = max(1, nkv - round(fraction * nkv)) if heads else nkv
        groups = group_score.topk(keep_groups).indices.sort().values
        d_ff = mlp.proj.in_features
        ffn_score = energy[f"{name}.mlp.proj"] * mlp.proj.weight.detach().float().pow(2).sum(0)
        channels = ffn_score.topk(max(1, d_ff - round(fraction * d_ff))).indices.sort().values
        plan[name] = {"kv_groups": groups, "channels": channels}
    return plan


@torch.no_grad()
def mask_like_plan(model: nn.Module, plan: dict[str, dict]) -> None:
    """The original model with what `plan` removes zeroed at the output projections' inputs:
    computes exactly what the structurally pruned model computes (the test's reference)."""
    for name, block in _blocks(model):
        attn, p = block.attn, plan[name]
        cols = torch.zeros(attn.proj.in_features, dtype=torch.bool)
        cols[_query_columns(attn, p["kv_groups"])] = True
        attn.proj.weight[:, ~cols] = 0
        keep = torch.zeros(block.mlp.proj.in_features, dtype=torch.bool)
        keep[p["channels"]] = True
        block.mlp.proj.weight[:, ~keep] = 0


def _query_columns(attn, groups: torch.Tensor) -> torch.Tensor:
    hd, rep = attn.head_dim, attn.n_head // attn.n_kv_heads
    heads = (groups[:, None] * rep + torch.arange(rep)).flatten()
    return (heads[:, None] * hd + torch.arange(hd)).flatten()


@torch.no_grad()
def apply_structured(model: nn.Module, plan: dict[str, dict], model_cfg):
    """Remove the heads and channels `plan` drops, in place; returns the smaller model config."""
    new_heads = new_kv = d_ff = None
    for name, block in _blocks(model):
        attn, mlp, p = block.attn, block.mlp, plan[name]
        hd, nh, nkv = attn.head_dim, attn.n_head, attn.n_kv_heads
        q_cols = _query_columns(attn, p["kv_groups"])
        kv_rows = (p["kv_groups"][:, None] * hd + torch.arange(hd)).flatten()
        rows = torch.cat([q_cols, nh * hd + kv_rows, (nh + nkv) * hd + kv_rows])
        w, b = attn.qkv.weight, attn.qkv.bias
        attn.qkv = _linear(w[rows], None if b is None else b[rows])
        attn.proj = _linear(attn.proj.weight[:, q_cols], attn.proj.bias)
        attn.n_kv_heads = len(p["kv_groups"])
        attn.n_head = attn.n_kv_heads * (nh // nkv)
        ch = p["channels"]
        for up in ("fc", "gate", "up"):
            if hasattr(mlp, up):
                lin = getattr(mlp, up)
                setattr(mlp, up, _linear(lin.weight[ch], None if lin.bias is None else lin.bias[ch]))
        mlp.proj = _linear(mlp.proj.weight[:, ch], mlp.proj.bias)
        new_heads, new_kv, d_ff, head_dim = attn.n_head, attn.n_kv_heads, len(ch), hd
    if new_heads is None:
        raise UserError("prune.method=structured: the model has no transformer blocks")
    return dataclasses.replace(
        model_cfg,
        n_head=new_heads,
        n_kv_heads=None if model_cfg.n_kv_heads in (None, model_cfg.n_head) else new_kv,
        d_ff=d_ff,
        head_dim=head_dim,
    )


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zeros among the prunable layers' weights."""
    layers = prunable(model).values()
    total = sum(m.weight.numel() for m in layers)
    return sum(int((m.weight == 0).sum()) for m in layers) / max(total, 1)
