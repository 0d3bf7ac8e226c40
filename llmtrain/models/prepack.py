"""Decoding-time copies of the linear layers' weights in the layout the CPU GEMM reads fastest.

A decoding step multiplies a few rows (the batch) by every weight matrix. nn.Linear keeps its
weight as [out, in], and MKL's kernel for x @ W.T at a handful of rows runs well below the speed
of the same product on a [in, out] matrix, or on a oneDNN-reordered one (docs/benchmarks.md,
"Generation against transformers"). `prepacked(model, rows)` gives every plain nn.Linear whose
weight is fp32 on the CPU a forward that uses such a copy while the block lasts:

  * large weights at more than one row: oneDNN's reordered weight (`torch.ops.mkldnn`, the ops
    Inductor's CPU freezing uses), about 1.4x faster at 8 rows at 124M parameters;
  * large weights at one row: no copy, but the matrix-vector product split into blocks of rows
    in one bmm, which uses every thread (MKL runs a one-row product on one thread): 1.3-1.8x
    per product with 2 threads, the same values bit for bit;
  * small weights: a transposed contiguous copy, so F.linear runs the [in, out] kernel (what HF
    GPT-2's Conv1D runs, bit for bit): about 1.7x faster per small layer, whose matmuls are a
    small model's decoding step.

The parameters, the state dict and checkpoints are untouched; the copies (one more copy of the
weights in memory while decoding, where they fit) are dropped on exit. CUDA, other dtypes, autocast and
torch.compile'd models keep the plain forward.

Within the block the modules of a model without hooks are also called directly:
nn.Module.__call__ (hook checks, tracing state) and Module.__getattr__ (submodules and parameters
live in dicts it searches) cost about 2.5 us per module per step, which was a quarter of a small
model's decoding step (gpt_small: 0.47 -> 0.36 ms). Each such module's class is swapped for a cached subclass whose
__call__ is its forward, and its submodules, parameters and buffers are mirrored into its
instance dict; both are undone on exit. The same ops run, so results are bit for bit the same.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# Below this many weight elements the matrix stays in cache and the transposed copy is the
# faster of the two (gpt_small's 128 x 512 layers: oneDNN's kernel was 1.3x slower there).
ONEDNN_MIN_NUMEL = 1 << 18
# Preparing the copies costs about as much as a few decoding steps of a 124M model; shorter
# generations keep the plain forward.
MIN_NEW_TOKENS = 16
# The copies hold the weights a second time while decoding: only when they take at most this
# share of the memory still available (a model near the machine's memory keeps the plain forward).
COPY_MEMORY_SHARE = 0.25


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable); unknown: 0."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _onednn_linear(w: torch.Tensor, bias, rows: int) -> Callable | None:
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # a build without oneDNN's linear ops
        return None
    return lambda x: op(x, packed, bias, "none", [], "")


def split_rows_linear(w: torch.Tensor, bias, parts: int) -> Callable:
    """F.linear of one row by w, as `parts` matrix-vector products over blocks of w's rows in one
    bmm: MKL runs a one-row product on one thread whatever torch's setting, and bmm spreads its
    batch over the threads (1.3-1.8x per product with 2 threads here). Each output element is the
    same dot product, bit for bit (tested). The blocks are views: no copy. Rows past the last
    whole block (a vocabulary like 50257) take one plain F.linear; more rows, or one thread at
    the call (threads.decoding_threads on busy cores), the plain forward."""
    n, k = w.shape
    size = n // parts
    whole = size * parts
    blocks = w[:whole].view(parts, size, k).transpose(1, 2)  # [parts, in, size]
    bias_blocks = None if bias is None else bias[:whole].view(parts, 1, size)
    rest_w = w[whole:]
    rest_b = None if bias is None else bias[whole:]
    get_threads = torch.get_num_threads

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() != k or get_threads() == 1:
            return F.linear(x, w, bias)
        xs = x.view(1, 1, k).expand(parts, 1, k)
        y = torch.bmm(xs, blocks) if bias_blocks is None else torch.baddbmm(bias_blocks, xs, blocks)
        y = y.view(x.shape[:-1] + (whole,))
        return y if whole == n else torch.cat((y, F.linear(x, rest_w, rest_b)), -1)

    return forward


def _copies(w: torch.Tensor, rows: int) -> bool:
    """Whether _fast_forward makes a copy of w (else it uses views of it, or nothing)."""
    return w.numel() < ONEDNN_MIN_NUMEL or rows > 1


def _fast_forward(w: torch.Tensor, bias, rows: int) -> Callable | None:
    if not _copies(w, rows):  # a large matrix-vector product: spread over the threads
        parts = torch.get_num_threads()
        return split_rows_linear(w, bias, parts) if parts > 1 and w.shape[0] >= parts else None
    if w.numel() >= ONEDNN_MIN_NUMEL:
        if not torch.backends.mkldnn.is_available():
            return None
        return _onednn_linear(w, bias, rows)
    w_t = w.t().contiguous().t()  # the same [out, in] matrix, stored [in, out]
    return lambda x: F.linear(x, w_t, bias)


def _call_forward(self, *args, **kwargs):
    return self.forward(*args, **kwargs)


_direct_classes: dict[type, type] = {}


def _direct_class(cls: type) -> type:
    """cls with a __call__ that is its forward (the same name, so reprs and errors read the same)."""
    if cls not in _direct_classes:
        attrs = {"__call__": _call_forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _direct_classes[cls] = type(cls.__name__, (cls,), attrs)
    return _direct_classes[cls]


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(
        module._global_forward_hooks
        or module._global_forward_pre_hooks
        or module._global_backward_hooks
        or module._global_backward_pre_hooks
    )


@contextmanager
def direct_calls(model: nn.Module) -> Iterator[None]:
    """Within the block, the modules of a model without hooks are called without
    nn.Module.__call__ and find their submodules, parameters and buffers without
    Module.__getattr__ (module docstring). The module tree must not change inside the block."""
    swapped: list[tuple[nn.Module, type, list[str]]] = []
    modules = list(dict.fromkeys(model.modules()))  # a shared module once
    # Any hook leaves the whole model alone: a hook may swap parameters while it runs (FSDP2
    # unshards into the module's table, which a mirrored entry would hide).
    if _global_hooks() or any(_has_hooks(m) for m in modules):
        yield
        return
    try:
        for m in modules:
            cls = type(m)
            if cls.__call__ is not nn.Module.__call__:
                continue
            mirrored = []
            for table in (m._modules, m._parameters, m._buffers):
                for name, value in table.items():
                    if value is not None and name not in m.__dict__:
                        object.__setattr__(m, name, value)  # nn.Module.__setattr__ would file it in the table
                        mirrored.append(name)
            m.__class__ = _direct_class(cls)
            swapped.append((m, cls, mirrored))
        yield
    finally:
        for m, cls, mirrored in reversed(swapped):
            m.__class__ = cls
            for name in mirrored:
                m.__dict__.pop(name, None)


@contextmanager
def prepacked(model: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, model's plain fp32 CPU nn.Linear layers multiply by a decoding-friendly
    copy of their weight (prepared for `rows` rows at a time, correct for any), and its modules are
    called directly (direct_calls). Weights must not change inside the block (call it under
    inference_mode)."""
    # a torch.compile'd model runs the graph it traced
    if hasattr(model, "_orig_mod"):
        yield
        return
    with _weight_copies(model, rows), direct_calls(model):
        yield


@contextmanager
def _weight_copies(model: nn.Module, rows: int) -> Iterator[None]:
    patched: list[nn.Module] = []
    # autocast picks the matmul dtype in F.linear
    if torch.is_autocast_enabled("cpu"):
        yield
        return
    shared: dict[tuple[int, int], Callable] = {}  # tied weights: one copy per (weight, bias)
    linears = [
        m
        for m in model.modules()
        if type(m) is nn.Linear
        and "forward" not in m.__dict__
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32
    ]
    copied = sum({id(m.weight): m.weight.numel() * 4 for m in linears if _copies(m.weight, rows)}.values())
    if copied > COPY_MEMORY_SHARE * available_memory():  # a large model: no second copy of it
        linears = [m for m in linears if not _copies(m.weight, rows)]
    try:
        for m in linears:
            w = m.weight
            key = (id(w), id(m.bias))
            if key not in shared:
                shared[key] = _fast_forward(w.detach(), None if m.bias is None else m.bias.detach(), rows)
            if shared[key] is not None:
                m.forward = shared[key]  # an instance attribute: nn.Module.__call__ (hooks included) calls it
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
