"""Model architectures. Importing this package registers them under kind "model"."""
from __future__ import annotations

import torch.nn as nn

from llmtrain.config.schema import ModelConfig
from llmtrain.models import bert, gpt2, llama  # noqa: F401  (registration)
from llmtrain.models.bert import Bert
from llmtrain.models.gpt2 import GPT2
from llmtrain.models.layers import KVCache
from llmtrain.models.llama import Llama


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the registered architecture cfg.name (cfg.vocab_size must be resolved)."""
    from llmtrain.registry import get

    return get("model", cfg.name)(cfg)


__all__ = ["build_model", "KVCache", "GPT2", "Llama", "Bert"]
