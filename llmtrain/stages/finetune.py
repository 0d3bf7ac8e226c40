"""finetune: continue training a checkpoint (init_from=PATH) on other data with the same trainer."""
from __future__ import annotations

import dataclasses

from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.registry import get
from llmtrain.stages.common import checkpoint_meta, load_checkpoint, load_corpus, setup_runtime
from llmtrain.stages.pretrain import train_and_report


def run(cfg: RunConfig) -> float | None:
    if not cfg.init_from:
        raise UserError("finetune needs init_from=PATH (a checkpoint or run directory)")
    rt = setup_runtime(cfg)
    loaded = load_checkpoint(cfg.init_from)
    # The checkpoint decides architecture and tokenizer; dropout may be changed for fine-tuning.
    model_cfg = dataclasses.replace(loaded.model_cfg, dropout=cfg.model.dropout)
    model = loaded.model
    for module in model.modules():
        if isinstance(module, __import__("torch").nn.Dropout):
            module.p = model_cfg.dropout
    tokenizer, splits = load_corpus(cfg, tokenizer=loaded.tokenizer)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the checkpoint's context "
                        f"({model_cfg.max_seq_len})")
    if rt.is_main:
        print(f"finetune: initialised from {loaded.path} (step {loaded.meta.get('step')})", flush=True)
    objective = get("objective", cfg.objective.name)(cfg.objective, tokenizer)
    meta = checkpoint_meta(cfg, model_cfg, tokenizer)
    meta["init_from"] = str(loaded.path)
    return train_and_report(cfg, rt, model, objective, splits, meta)
