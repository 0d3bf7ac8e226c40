"""The contract between the trainer and what it trains (a pretraining objective or a fine-tuning
task): data are bound when it is built, then it gives batches and turns (model, batch) into a loss.

    obj = build_objective(cfg.objective, tokenizer, splits, cfg.data, seed)   # llmtrain.objectives
    source = obj.train_source(rank, world)     # .batch(step) -> dict of tensors
    for batch in obj.val_batches(max_batches, rank, world): ...
    out = obj.loss(model, batch)               # LossOutput

A trainee may also train parameters of its own, outside the model: `extra`, an nn.Module or
absent (distillation's hidden-state projection, objectives/distill.py). The trainer optimises
them with the model and keeps them in the train state, never in the model's weights.

Batches are functions of (seed, step, rank) so runs are deterministic and resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

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


@runtime_checkable
class Trainee(Protocol):
    """What the trainer trains: an Objective (pretrain) or a Task (finetune, llmtrain/tasks)."""

    needs_decoder: bool | None  # True: needs a causal decoder; False: needs an encoder; None: either

    def train_source(self, rank: int = 0, world: int = 1) -> BatchSource:
        """This rank's training batches (of `world` ranks)."""
        ...

    def val_batches(self, max_batches: int = 0, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of the validation batches, the first max_batches (0: all) of them
        sharded by llmtrain.data.validation.shard."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput: ...


class Objective(Trainee):
    name = "base"
    needs_decoder: bool | None = None

    def __init__(
        self, cfg: ObjectiveConfig, tokenizer: Tokenizer, splits: TokenSplits, data_cfg: DataConfig, seed: int
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.splits, self.data_cfg, self.seed = splits, data_cfg, seed  # the data it trains and validates on

    def train_source(self, rank: int = 0, world: int = 1) -> BatchSource:
        raise NotImplementedError

    def val_batches(self, max_batches: int = 0, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labels != -100, and the number of such labels."""
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100
    )
    return loss, (labels != -100).sum()
