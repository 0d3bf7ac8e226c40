"""evaluate: validation loss, perplexity and bits per byte of a checkpoint on the configured data."""
from __future__ import annotations

import json
import math

import torch

from llmtrain.config.schema import DataConfig, RunConfig
from llmtrain.data.corpus import split_tokens
from llmtrain.data.sources import read_documents
from llmtrain.errors import UserError
from llmtrain.registry import get
from llmtrain.stages.common import atomic_write, load_checkpoint, setup_runtime
from llmtrain.train.device import autocast
from llmtrain.train.trainer import move


def run(cfg: RunConfig) -> float | None:
    if not cfg.checkpoint:
        raise UserError("evaluate needs checkpoint=PATH (a checkpoint or run directory)")
    rt = setup_runtime(cfg)
    loaded = load_checkpoint(cfg.checkpoint, rt.device)
    # Default to the data the checkpoint was trained on; data=... data.path=... overrides it.
    data = cfg.data
    if not data.path:
        data = DataConfig(**loaded.meta["config"]["data"])
    docs = read_documents(data.path, data.text_field, data.encoding_errors, data.doc_pattern)
    splits = split_tokens(docs, loaded.tokenizer, data.val_fraction)
    if len(splits.val) < 2:
        raise UserError(f"data {data.path}: the validation split is empty (data.val_fraction={data.val_fraction})")
    objective_name = loaded.meta.get("objective", "clm")
    objective = get("objective", objective_name)(cfg.objective, loaded.tokenizer)
    seq_len = min(data.seq_len, loaded.model_cfg.max_seq_len)
    data = DataConfig(**{**data.__dict__, "seq_len": seq_len})

    model = loaded.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in objective.val_batches(splits, data, cfg.trainer.eval_batches):
            batch = move(batch, rt.device)
            with autocast(rt.device, rt.precision):
                out = objective.loss(model, batch)
            total += float(out.loss) * int(out.n_targets)
            count += int(out.n_targets)
    loss = total / max(count, 1)
    results = {
        "checkpoint": str(loaded.path),
        "data": data.path,
        "val/loss": loss,
        "val/ppl": math.exp(min(loss, 700.0)),
        "val/bits_per_byte": total / (math.log(2) * max(splits.val_bytes, 1)),
        "val/tokens": count,
    }
    if rt.is_main:
        atomic_write(rt.run_dir / "eval.json", json.dumps(results, indent=2))
        width = max(len(k) for k in results)
        for k, v in results.items():
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return loss
