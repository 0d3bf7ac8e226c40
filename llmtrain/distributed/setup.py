"""torch.distributed setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), and the
collectives the stages use; each is a no-op in a single process."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up; a plain single process returns rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        # A process group left alive at interpreter exit can abort the process while its
        # threads are torn down ("terminate called without an active exception").
        atexit.register(_shutdown)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world() -> tuple[int, int]:
    """(rank, world size) of this process (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_str(value: str | None) -> str | None:
    """Rank 0's value on every rank (e.g. the run directory)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (so large token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        # NCCL reduces only CUDA tensors; gloo only CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_indexed(pairs: list[tuple[int, Any]]) -> list[Any]:
    """(index, value) pairs from every rank -> the values in index order (on every rank)."""
    pairs = sorted((p for part in all_gather_object(pairs) for p in part), key=lambda p: p[0])
    if len({i for i, _ in pairs}) != len(pairs):  # a sharding bug would double count: fail loudly
        raise RuntimeError("evaluation shards overlap")
    return [v for _, v in pairs]


_CPU_GROUP = None


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (e.g. a signal one rank received)."""
    return bool(max_across_ranks(int(flag)))


def max_across_ranks(value: int) -> int:
    """The largest of every rank's host-side `value`, on every rank.

    Reduced over a CPU (gloo) group, so under NCCL it costs no device synchronisation.
    """
    global _CPU_GROUP
    if not dist.is_initialized():
        return value
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
    return int(t.item())
