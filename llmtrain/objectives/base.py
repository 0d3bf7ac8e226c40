"""The objective contract: it turns token splits into batches and (model, batch) into a loss.

    obj = get("objective", cfg.objective.name)(cfg.objective, tokenizer)
    source = obj.train_source(splits, data_cfg, seed, rank, world)   # .batch(step) -> dict
    for batch in obj.val_batches(splits, data_cfg, ...): ...
    out = obj.loss(model, batch)     # LossOutput

Batches are functions of (seed, step, rank) so runs are deterministic and resume exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from llmtrain.config.schema import DataConfig, ObjectiveConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.tokenizers import Tokenizer


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean loss over the counted targets (what is backpropagated)
    n_targets: torch.Tensor  # how many targets the mean is over (for exact aggregation)
    # Extra metrics as (sum, count) tensor pairs, e.g. {"mlm_accuracy": (correct, total)}.
    extras: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class BatchSource(Protocol):
    def batch(self, step: int) -> dict[str, torch.Tensor]: ...


class Objective:
    name = "base"
    decoder_only: bool | None = None  # True: needs a causal decoder; False: needs an encoder

    def __init__(self, cfg: ObjectiveConfig, tokenizer: Tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def train_source(self, splits: TokenSplits, data: DataConfig, seed: int,
                     rank: int = 0, world_size: int = 1) -> BatchSource:
        raise NotImplementedError

    def val_batches(self, splits: TokenSplits, data: DataConfig, max_batches: int = 0,
                    rank: int = 0, world_size: int = 1, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labels != -100, and the number of such labels."""
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100
    )
    return loss, (labels != -100).sum()
