"""Apply the parallelism strategy (plus activation checkpointing and compile) to the loss module.

Order follows torchtitan: activation checkpointing -> compile -> DDP / FSDP2.

- single: one process, the module as is.
- ddp:    DistributedDataParallel over the whole loss module (replicated weights, all-reduced grads).
- fsdp:   FSDP2 `fully_shard` on each transformer block (`model.blocks[i]`), then on the loss
          module as the root, so embeddings/head/final norm form the root's group and are gathered
          whenever the loss is computed, whichever model methods the objective calls. With bf16,
          parameters are gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy).
"""

from __future__ import annotations

import contextlib

import torch

from llmtrain.config.schema import TrainerConfig
from llmtrain.distributed.setup import DistInfo
from llmtrain.errors import UserError

STRATEGIES = ("auto", "single", "ddp", "fsdp")


def resolve_strategy(tc: TrainerConfig, dist: DistInfo) -> str:
    if tc.strategy not in STRATEGIES:
        raise UserError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {tc.strategy!r}")
    strategy = tc.strategy
    if strategy == "auto":
        strategy = "ddp" if dist.enabled else "single"
    if strategy in ("ddp", "fsdp") and not dist.enabled:
        strategy = "single"  # one process: nothing to shard or synchronise
    if strategy == "single" and dist.enabled:
        raise UserError("trainer.strategy=single with several processes; use ddp or fsdp")
    return strategy


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise UserError(
            f"{type(module).__name__} has no `blocks` ModuleList; "
            "trainer.strategy=fsdp and trainer.activation_checkpointing need one"
        )
    return list(blocks)


def wrap_model(
    module: torch.nn.Module, tc: TrainerConfig, device: torch.device, precision: str, dist: DistInfo
) -> torch.nn.Module:
    """`module` is a LossModule (`.model` is the transformer). Parameters are moved to `device`;
    the returned module is what the trainer calls. The inner model keeps its parameter names."""
    strategy = resolve_strategy(tc, dist)
    module.to(device)
    if tc.activation_checkpointing:
        # The composable API keeps parameter names unchanged (no `_checkpoint_wrapped_module.`).
        from torch.distributed._composable import checkpoint

        for block in _blocks(module.model):
            checkpoint(block)  # recompute the block's activations in backward (non-reentrant)
    if tc.compile:
        # In-place compile keeps state-dict keys. Under FSDP, compile per block (graph breaks at
        # the FSDP hooks between blocks); otherwise one graph for the whole loss computation.
        if strategy == "fsdp":
            for block in _blocks(module.model):
                block.compile()
        else:
            module.compile()
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if precision == "fp16":
            raise UserError("trainer.strategy=fsdp supports precision bf16 or fp32, not fp16")
        mesh = init_device_mesh(device.type, (dist.world_size,))
        mp = MixedPrecisionPolicy()
        if precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # Ranks seed differently (dropout), so their freshly built weights differ; DDP broadcasts
        # rank 0's at construction, FSDP would shard each rank's own: broadcast first.
        with torch.no_grad():
            for t in module.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        blocks = _blocks(module.model)
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again at once by the backward: keep them.
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(module, mesh=mesh, mp_policy=mp)
    return module


def is_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def root_unsharded(module: torch.nn.Module):
    """Run the model inside an FSDP loss module directly (generation, a task's evaluation): the
    root group's parameters (embeddings, head, final norm) are gathered for the duration, the
    blocks gather their own in their forward hooks. Every rank must run the same forwards (each
    gather is a collective). Anything else: nothing to do."""
    if not is_fsdp(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
