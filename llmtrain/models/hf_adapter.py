"""Checks shared by the models' HF state-dict adapters (each model file's `hf_config`)."""

from __future__ import annotations

from llmtrain.config.schema import ModelConfig
from llmtrain.errors import UserError


def refuse_narrow_heads(cfg: ModelConfig, hf_config_name: str) -> None:
    """An HF config without head_dim cannot hold attention narrower than d_model (structured
    pruning removes heads and keeps d_model)."""
    if cfg.head_dim and cfg.head_dim * cfg.n_head != cfg.d_model:
        raise UserError(
            f"{hf_config_name} has no head_dim: a {cfg.name} model with {cfg.n_head} heads of {cfg.head_dim} "
            f"(attention heads removed by structured pruning) is narrower than d_model={cfg.d_model} inside "
            "attention and cannot be exported to transformers (prune.heads=false prunes FFN channels only; "
            "llama exports either)"
        )
