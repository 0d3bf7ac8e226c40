"""Quantization-aware fine-tuning (finetune.qat=int8|int4): fake-quantized layers and the
conversion at the end.

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

from llmtrain.compress import quant

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
