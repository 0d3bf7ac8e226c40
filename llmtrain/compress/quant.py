"""Post-training quantization of a model's linear layers, and the quantized layer itself.

    int8          weight-only, per output channel, symmetric:   w ~ q * s[row],       q in [-127, 127]
    int4          weight-only, group-wise (group_size inputs), asymmetric:
                  w ~ q * s[row, g] + m[row, g],  q in [0, 15], two per byte
    int8_dynamic  int8 weights as above, activations quantized to int8 per token at run time

On disk a quantized layer is plain tensors under its module name: `qweight` (int8, or uint8
holding two int4 codes), `scale` (and `zero` for int4), `bias`; meta.json["quant"] names the
method, group size, backend and the layers, and `restore` rebuilds the layers before the weights
are loaded (llmtrain/checkpoints.py). int8 and int8_dynamic use torchao's Int8Tensor (its
quantizer and its CPU kernels) when torchao imports; int4 is our reference quantizer, since
torchao's int4 layouts need CUDA-only kernels (mslk / tinygemm) that do not run on CPU.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmtrain.errors import UserError

METHODS = ("int8", "int4", "int8_dynamic")


@lru_cache(maxsize=1)
def torchao_int8():
    """torchao's Int8Tensor and its helpers, or None where torchao does not import on this torch."""
    # its optional CUDA extensions and a torch deprecation warn on import, which is noise on a CPU
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
    except Exception:  # noqa: BLE001 - any import failure means: use the reference quantizer
        return None
    finally:
        quiet[1].setLevel(levels[1])
    return Int8Tensor, PerRow, QuantizeTensorToInt8Kwargs


def backend_for(method: str) -> str:
    return "torchao" if method != "int4" and torchao_int8() is not None else "reference"


# ----------------------------------------------------------------------------- reference quantizers


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [out, in] int8, scale [out] fp32), |w - q*s| <= s/2."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def quantize_int4(
    w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: (packed uint8 [out, in/2], scale, zero [out, in/g] fp16).
    Each group of `group_size` inputs maps [min, max] onto 0..15; |w - deq| <= scale/2 (+ fp16
    rounding of scale and zero). `clip` [out] shrinks each row's ranges (outliers clamp)."""
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    if clip is not None:
        lo, hi = lo * clip[:, None], hi * clip[:, None]
    scale = ((hi - lo) / 15).clamp_min(1e-8).half()
    zero = lo.half()
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(out_f, in_f)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed, scale, zero, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(packed)
    out_f, in_f = q.shape
    g = q.reshape(out_f, scale.shape[1], -1).to(dtype)
    return (g * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]).reshape(out_f, in_f)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 of activations (dynamic: computed for every input)."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True).float() / 127).clamp_min(1e-12)
    return torch.round(x.float() / scale).clamp(-127, 127), scale


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def search_clip(w: torch.Tensor, group_size: int, x: torch.Tensor) -> torch.Tensor:
    """Per output row, the range-shrink ratio whose int4 weights best reproduce the layer's
    outputs on calibration inputs x [N, in] (AWQ's clipping search, without its scaling)."""
    best_err = torch.full((w.shape[0],), float("inf"))
    best = torch.ones(w.shape[0])
    for r in CLIP_RATIOS:
        clip = torch.full((w.shape[0],), r)
        err = ((x @ (w - dequantize_int4(*quantize_int4(w, group_size, clip))).t()) ** 2).sum(0)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, clip, best)
    return best


def collect_inputs(model: nn.Module, names: list[str], run, max_rows: int = 2048) -> dict[str, torch.Tensor]:
    """Up to max_rows input rows of each named layer, over the forward passes `run` makes."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    for name in names:

        def hook(mod, inp, out, name=name):
            have = sum(t.shape[0] for t in rows[name])
            if have < max_rows:
                rows[name].append(inp[0].detach().float().reshape(-1, inp[0].shape[-1])[: max_rows - have].cpu())

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items() if r}


# ----------------------------------------------------------------------------- the quantized layer


class QuantLinear(nn.Module):
    """A linear layer holding quantized weights (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: str, group_size: int, backend: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size, self.backend = method, group_size, backend
        if method == "int4":
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, in_features // group_size, dtype=torch.half))
            self.register_buffer("zero", torch.zeros(out_features, in_features // group_size, dtype=torch.half))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._ao = None  # torchao Int8Tensor view of (qweight, scale), built on first use

    @classmethod
    def from_linear(
        cls, lin: nn.Linear, method: str, group_size: int, backend: str, inputs: torch.Tensor | None = None
    ) -> QuantLinear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, method, group_size, backend)
        w = lin.weight.detach().float()
        with torch.no_grad():
            if method == "int4":
                clip = None if inputs is None else search_clip(w, group_size, inputs)
                q.qweight, q.scale, q.zero = quantize_int4(w, group_size, clip)
            elif backend == "torchao":
                Int8Tensor, PerRow, _ = torchao_int8()
                t = Int8Tensor.from_hp(w, PerRow())
                q.qweight, q.scale = t.qdata.contiguous(), t.scale.reshape(-1).float().contiguous()
            else:
                q.qweight, q.scale = quantize_int8(w)
            if lin.bias is not None:
                q.bias.copy_(lin.bias.detach().float())
        return q.to(lin.weight.device)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        if self.method == "int4":
            return dequantize_int4(self.qweight, self.scale, self.zero, dtype)
        return dequantize_int8(self.qweight, self.scale, dtype)

    def _torchao_weight(self):
        if self._ao is None or self._ao.qdata.data_ptr() != self.qweight.data_ptr():
            Int8Tensor, PerRow, Kwargs = torchao_int8()
            act = Kwargs(granularity=PerRow()) if self.method == "int8_dynamic" else None
            self._ao = Int8Tensor(
                self.qweight, self.scale[:, None], [1, self.in_features], torch.float32, act_quant_kwargs=act
            )
        return self._ao

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.backend == "torchao" and x.dtype == torch.float32:
            return F.linear(x, self._torchao_weight(), bias)
        if self.method == "int8_dynamic":
            # integer codes multiplied in fp32 (exact for these sizes), then both scales applied
            xq, xs = quantize_activations_int8(x)
            y = (xq @ self.qweight.float().t()) * xs * self.scale
            return (y if bias is None else y + bias.float()).to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"{self.in_features}, {self.out_features}, method={self.method}{g}, backend={self.backend}"


# ----------------------------------------------------------------------------- whole models


def quantizable(model: nn.Module, group_size: int | None = None) -> list[str]:
    """Names of the nn.Linear layers to quantize: all of them except an output head tied to the
    token embedding (its weight is the embedding table, not a linear layer's own), and, for int4,
    layers whose input size the group size does not divide."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and id(m.weight) not in embeddings:
            if group_size is None or m.in_features % group_size == 0:
                names.append(name)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, method: str, group_size: int = 32, calibrate=None) -> dict[str, Any]:
    """Replace the linear layers of `model` in place; returns the meta.json["quant"] record.
    `calibrate` (int4): a function running the model over calibration batches, for search_clip."""
    if method not in METHODS:
        raise UserError(f"quant.method={method!r} is not one of {', '.join(METHODS)}")
    g = group_size if method == "int4" else None
    names = quantizable(model, g)
    if not names:
        raise UserError(f"quant.method={method}: the model has no linear layer to quantize")
    backend = backend_for(method)
    inputs = collect_inputs(model, names, calibrate) if calibrate is not None and method == "int4" else {}
    for name in names:
        lin = model.get_submodule(name)
        _replace(model, name, QuantLinear.from_linear(lin, method, group_size, backend, inputs.get(name)))
    skipped = [n for n in quantizable(model) if n not in names]
    return {"method": method, "group_size": group_size, "backend": backend, "layers": names, "skipped": skipped}


def restore(model: nn.Module, record: dict[str, Any]) -> None:
    """Put empty QuantLinear layers where a quantized checkpoint has them (before its weights
    load). The backend is chosen again here: a checkpoint quantized by torchao runs on the
    reference kernels where torchao is missing, and gives the same dequantized weights."""
    method, group_size = record["method"], int(record.get("group_size") or 32)
    backend = backend_for(method)
    for name in record["layers"]:
        lin = model.get_submodule(name)
        _replace(
            model,
            name,
            QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, method, group_size, backend),
        )


def dequantize_model(model: nn.Module) -> nn.Module:
    """QuantLinear -> nn.Linear with the dequantized weights (in place)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            _replace(model, name, lin)
    return model


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights as stored (quantized codes + scales, or fp weights)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            stored = (m.qweight, m.scale, getattr(m, "zero", None))
            total += sum(b.numel() * b.element_size() for b in stored if b is not None)
        elif type(m) is nn.Linear and id(m.weight) not in embeddings:
            total += m.weight.numel() * m.weight.element_size()
    return total
