"""Process-group setup and model wrapping (DDP / FSDP2) for the shared trainer."""
from llmtrain.distributed.setup import DistInfo, all_reduce_sum, barrier, broadcast_str, init_distributed, is_main

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "broadcast_str", "init_distributed", "is_main"]
