"""What a compressed checkpoint changes in a model before its weights load: quantized layers
(meta.json["compression"]["quant"]) and pruning masks (MODULE.weight_mask tensors in the weights).
Called by the one checkpoint loader, llmtrain/checkpoints.py."""

from __future__ import annotations

from typing import Any

import torch

from llmtrain.compress import prune, quant
from llmtrain.errors import UserError


def compression_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's compression record ({} for an uncompressed one)."""
    rec = meta.get("compression")
    return rec if isinstance(rec, dict) else {}


def restore_layout(model: torch.nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    record = compression_of(meta).get("quant")
    try:
        if record:
            quant.restore(model, record)
        prune.attach_from_state(model, state)
    except (AttributeError, KeyError, TypeError) as e:  # a record naming layers this model lacks
        raise UserError(f"checkpoint's compression record does not match its model: {e}") from None


def compressed_meta(source_meta: dict[str, Any], source_path, model_cfg, method: str, **record: Any) -> dict[str, Any]:
    """meta.json of a compressed checkpoint: the source's (tokenizer, task, objective, the run
    config its data comes from) with the new model config and the compression record."""
    import dataclasses

    drop = ("format", "step", "files", "metrics", "metrics_step", "lora", "adapter")
    meta = {k: v for k, v in source_meta.items() if k not in drop}
    earlier = compression_of(source_meta)
    meta.update(
        model=dataclasses.asdict(model_cfg),
        init_from=str(source_path),
        compression={**earlier, "method": method, "source": str(source_path), **record},
    )
    return meta
