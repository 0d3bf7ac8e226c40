"""Model architectures. Importing this package registers them under kind "model"."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from llmtrain import registry
from llmtrain.config.schema import ModelConfig
from llmtrain.errors import UserError
from llmtrain.models import bert, gpt2, llama, t5  # noqa: F401  (registration)
from llmtrain.models.bert import Bert
from llmtrain.models.gpt2 import GPT2
from llmtrain.models.layers import KVCache
from llmtrain.models.llama import Llama
from llmtrain.models.t5 import T5


def resolve_model_config(model: ModelConfig, tokenizer) -> ModelConfig:
    """Fill vocab_size from the tokenizer (padded up: multiples of 64 run faster on GPUs)."""
    if model.vocab_size and model.vocab_size < tokenizer.vocab_size + model.extra_ids:
        raise UserError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
            + (f" plus model.extra_ids={model.extra_ids}" if model.extra_ids else "")
        )
    if model.vocab_size:
        return model
    mult = max(1, model.pad_vocab_multiple)
    needed = tokenizer.vocab_size + model.extra_ids  # t5's sentinels sit above the tokenizer's ids
    return dataclasses.replace(model, vocab_size=-(-needed // mult) * mult)


def model_class(name: str) -> type[nn.Module]:
    """The registered architecture `name` (its class attributes, e.g. is_decoder, without building it)."""
    return registry.get("model", name)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the registered architecture cfg.name (cfg.vocab_size must be resolved)."""
    return model_class(cfg.name)(cfg)


__all__ = ["build_model", "model_class", "resolve_model_config", "KVCache", "GPT2", "Llama", "Bert", "T5"]
