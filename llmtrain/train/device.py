"""Device, precision and hardware peak FLOPS (for MFU)."""

from __future__ import annotations

import contextlib

import torch

from llmtrain.errors import UserError

# Dense bf16/fp16 tensor-core peak FLOPS per device (no sparsity).
PEAK_FLOPS = {
    "B200": 2250e12,
    "GH200": 989e12,
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A6000": 155e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device: unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def pick_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if name not in ("bf16", "fp16", "fp32"):
        raise UserError(f"trainer.precision must be auto, bf16, fp16 or fp32, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise UserError("trainer.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device) -> float | None:
    """Per-device dense peak, or None where unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():  # most specific names first
        if key in name:
            return value
    return None
