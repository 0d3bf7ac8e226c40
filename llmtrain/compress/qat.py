"""Quantization-aware fine-tuning (finetune.qat=int8|int4) and the other fine-tuning hooks of
compressed models.

While training, every quantizable linear layer (llmtrain/compress/quant.py) computes with its
weights fake-quantized by the same quantizer the final conversion uses, with a straight-through
gradient (w + (deq(q(w)) - w).detach()), so the model learns weights that survive rounding. The
parameters keep their names: intermediate checkpoints are ordinary full-precision ones. At the
end the layers are really quantized and the final checkpoint is replaced by the quantized one,
as `llmtrain quantize` would write it. (torchao's QAT flow targets its int4 CUDA layouts and
int8-activation schemes; the reference fake quantizer matches our CPU int4 format exactly.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmtrain.compress import prune, quant
from llmtrain.compress.layout import compression_of
from llmtrain.errors import UserError

QAT_METHODS = ("int8", "int4")


def fake_quantize(w: torch.Tensor, method: str, group_size: int) -> torch.Tensor:
    if method == "int4":
        deq = quant.dequantize_int4(*quant.quantize_int4(w, group_size), dtype=w.dtype)
    else:
        deq = quant.dequantize_int8(*quant.quantize_int8(w), dtype=w.dtype)
    return w + (deq - w).detach()  # straight-through estimator


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses fake-quantized weights (same parameters, same state dict)."""

    method: str = "int8"
    group_size: int = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.method, self.group_size), self.bias)


def _set_class(model: nn.Module, names: list[str], cls: type, **attrs) -> None:
    for name in names:
        m = model.get_submodule(name)
        m.__class__ = cls  # same parameters and buffers: only forward changes
        for k, v in attrs.items():
            setattr(m, k, v)


def prepare_qat(model: nn.Module, method: str, group_size: int) -> list[str]:
    names = quant.quantizable(model, group_size if method == "int4" else None)
    _set_class(model, names, FakeQuantLinear, method=method, group_size=group_size)
    return names


def convert_qat(model: nn.Module, method: str, group_size: int) -> dict:
    """Fake-quantized layers -> real quantized layers (in place); the quant record."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    _set_class(model, names, nn.Linear)
    for n in names:  # instance attributes set by prepare_qat
        for k in ("method", "group_size"):
            model.get_submodule(n).__dict__.pop(k, None)
    return quant.quantize_model(model, method, group_size)


# ----------------------------------------------------------------------------- finetune hooks


def check_init(cfg, loaded) -> None:
    """Refuse what cannot be fine-tuned: a quantized checkpoint (no trainable weights), masks
    under FSDP (sharded weights), QAT with LoRA or FSDP, an unknown finetune.qat."""
    ft = cfg.finetune
    if "quant" in compression_of(loaded.meta):
        raise UserError(
            f"init_from={loaded.path} is quantized and has no trainable weights; fine-tune its source "
            f"({compression_of(loaded.meta).get('source')}), with finetune.qat=int8|int4 for quantization-aware "
            "training"
        )
    if ft.qat is not None:
        if ft.qat not in QAT_METHODS:
            raise UserError(f"finetune.qat={ft.qat!r} is not one of {', '.join(QAT_METHODS)} (or null)")
        if ft.lora.r > 0 or cfg.trainer.strategy == "fsdp":
            raise UserError("finetune.qat cannot be combined with finetune.lora.r > 0 or trainer.strategy=fsdp")
        if ft.qat == "int4" and ft.qat_group_size % 2:
            raise UserError(f"finetune.qat_group_size={ft.qat_group_size} must be even")
    if prune.masks_of(loaded.model) and (cfg.trainer.strategy == "fsdp" or ft.lora.r > 0):
        raise UserError(
            f"init_from={loaded.path} has pruning masks: recover it with full fine-tuning "
            "(LoRA's merged update and FSDP's sharded weights cannot keep the pruned weights at zero)"
        )


def setup(cfg, model: nn.Module, loaded) -> str:
    """Before training: QAT layers; returns a note for the start-up line ('' if nothing)."""
    notes = []
    masks = prune.masks_of(model)
    if masks:
        notes.append(f"pruning masks on {len(masks)} layers kept at zero")
    if cfg.finetune.qat:
        names = prepare_qat(model, cfg.finetune.qat, cfg.finetune.qat_group_size)
        notes.append(f"QAT {cfg.finetune.qat} on {len(names)} linear layers")
    return "; ".join(notes)


def checkpoint_record(cfg, loaded) -> dict:
    """meta.json additions: the source's compression record carries on (the report compares
    with the original model); QAT is recorded while training."""
    rec = dict(compression_of(loaded.meta))
    if rec:
        rec["recovery_finetune_of"] = str(loaded.path)
    if cfg.finetune.qat:
        rec.update(method=f"qat {cfg.finetune.qat}", source=str(loaded.path), qat=cfg.finetune.qat)
    return {"compression": rec} if rec else {}


def finish_qat(cfg, trainer, model: nn.Module, meta: dict, metrics: dict):
    """After training: quantize the layers for real and replace the final checkpoint (collective)."""
    record = convert_qat(model, cfg.finetune.qat, cfg.finetune.qat_group_size)
    meta["compression"] = {**meta.get("compression", {}), "quant": record}
    trainer.meta = meta
    return trainer.save(metrics)


def check_resumable(cfg, newest_meta: dict | None) -> None:
    if cfg.trainer.resume == "auto" and newest_meta and "quant" in compression_of(newest_meta):
        raise UserError("the run's last checkpoint is the quantized end of a finished QAT run; nothing to resume")
