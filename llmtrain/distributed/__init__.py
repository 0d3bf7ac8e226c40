"""Process-group setup, model wrapping (DDP / FSDP2) and the local multi-process launcher."""
from llmtrain.distributed.setup import (DistInfo, all_gather_object, all_reduce_max, all_reduce_sum, any_rank, barrier,
                                        broadcast_str, init_distributed, is_main)

__all__ = ["DistInfo", "all_gather_object", "all_reduce_max", "all_reduce_sum", "any_rank", "barrier",
           "broadcast_str", "init_distributed", "is_main"]
