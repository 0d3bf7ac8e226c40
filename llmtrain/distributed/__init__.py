"""Process-group setup, model wrapping (DDP / FSDP2) and the local multi-process launcher."""

from llmtrain.distributed.setup import (
    DistInfo,
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_str,
    gather_indexed,
    init_distributed,
    is_main,
    max_across_ranks,
    sum_across_ranks,
    world,
)

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_str",
    "gather_indexed",
    "init_distributed",
    "is_main",
    "max_across_ranks",
    "sum_across_ranks",
    "world",
]
