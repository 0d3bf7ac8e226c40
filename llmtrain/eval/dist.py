"""Evaluation under torchrun: shard examples by rank without duplicates, gather results on every rank.

Training samplers pad the last shard with repeated examples so every rank runs the same number of
steps; for metrics that would count those examples twice. Here a rank takes every world-th *batch*
(batches are formed before sharding, so each batch is the same whatever the world size and the
numbers match a single process bit for bit), and results are put back in example order.
"""
from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_batches(items: Sequence[T], batch_size: int, rank: int, world_size: int) -> list[list[tuple[int, T]]]:
    """This rank's batches of (index, item): batch b of the whole list goes to rank b % world_size."""
    indexed = list(enumerate(items))
    batches = [indexed[i:i + batch_size] for i in range(0, len(indexed), max(1, batch_size))]
    return batches[rank::world_size]


def gather_indexed(pairs: list[tuple[int, Any]]) -> list[Any]:
    """(index, value) pairs from every rank -> the values in index order (on every rank)."""
    _, world_size = world()
    if world_size > 1:
        parts: list[list[tuple[int, Any]]] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(parts, pairs)
        pairs = [p for part in parts for p in part]
    pairs = sorted(pairs, key=lambda p: p[0])
    if len({i for i, _ in pairs}) != len(pairs):  # a sharding bug would double count: fail loudly
        raise RuntimeError("evaluation shards overlap")
    return [v for _, v in pairs]


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (so large token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world()[1] > 1:
        # NCCL reduces only CUDA tensors; gloo only CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
