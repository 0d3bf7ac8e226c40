"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A x with W frozen and only A [r, in] and
B [out, r] trained. B starts at zero, so an adapted model starts as exactly the base model.

    names = apply_lora(model, LoraConfig(r=8, targets=["attn"]))   # wraps matching nn.Linear
    merge_lora(model)                                             # W += scale * B A, unwraps

`LoRALinear` keeps the wrapped layer as `.base`, so state-dict keys of an unmerged model are
`...qkv.base.weight`, `...qkv.lora_A`, `...qkv.lora_B`; after merge_lora they are the plain
`...qkv.weight` again and the model loads anywhere a base model does.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn

from llmtrain.config.schema import LoraConfig
from llmtrain.errors import UserError


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        p = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=p.device, dtype=p.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=p.device, dtype=p.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # adapters_disabled(): the base layer alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


def _tied_param_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap every nn.Linear whose qualified name contains one of cfg.targets, and freeze every
    parameter that is not an adapter. Returns the wrapped module names (error if none)."""
    if cfg.r <= 0:
        raise UserError(f"finetune.lora.r must be > 0 to apply LoRA, got {cfg.r}")
    tied = _tied_param_ids(model)  # merging into a tied weight would also change the embedding
    hits = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(t in name for t in cfg.targets) and id(m.weight) not in tied
    ]
    if not hits:
        raise UserError(
            f"finetune.lora.targets={list(cfg.targets)} match no linear layer of the model "
            "(e.g. attn, attn.qkv, attn.proj, mlp)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in hits:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.r, cfg.alpha, cfg.dropout))
    return hits


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model inside the block: every adapter is bypassed (e.g. a preference-tuning
    reference is the base with its adapters off). A model without adapters is unchanged."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it (in place; returns the model)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, m.merged())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (what LoRA trained)."""
    return {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))
    }
