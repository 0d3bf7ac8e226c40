"""generate: sample text from a checkpoint."""
from __future__ import annotations

import torch

from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.generation import sample_text
from llmtrain.stages.common import load_checkpoint, setup_runtime


def run(cfg: RunConfig) -> None:
    if not cfg.checkpoint:
        raise UserError("generate needs checkpoint=PATH (a checkpoint or run directory)")
    rt = setup_runtime(cfg)
    loaded = load_checkpoint(cfg.checkpoint, rt.device)
    if not getattr(loaded.model, "is_decoder", True):
        raise UserError(f"checkpoint {loaded.path} is an encoder ({loaded.model_cfg.name}); generate needs a decoder")
    gen = torch.Generator(device=rt.device).manual_seed(cfg.trainer.seed)
    for i in range(cfg.num_samples):
        text = sample_text(loaded.model, loaded.tokenizer, cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=gen)
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(cfg.prompt + text, flush=True)
