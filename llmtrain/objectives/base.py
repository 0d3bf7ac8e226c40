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

import copy
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import torch

from llmtrain.config.schema import DataConfig, ModelConfig, ObjectiveConfig
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
    # The loss is a mean cross-entropy over tokens, so exp(loss) is a perplexity (val/ppl); not for
    # a classification head, span QA or a sum of two heads' losses (mlm_nsp).
    token_loss: bool

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
    needs_encoder_decoder = False  # True: span_corruption, denoising (t5); an encoder-decoder takes only these
    token_loss = True
    chunked_loss = False  # trainer.chunked_loss, set by the Trainer: the LM head's loss in chunks
    supports_mixture = False  # True: trains on data.sources (its windows come from data.mixture.train_windows)

    def __init__(
        self,
        cfg: ObjectiveConfig,
        tokenizer: Tokenizer,
        splits: TokenSplits,
        data_cfg: DataConfig,
        seed: int,
        model_cfg: ModelConfig | None = None,
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.splits, self.data_cfg, self.seed = splits, data_cfg, seed  # the data it trains and validates on
        self.model_cfg = model_cfg  # the resolved model config (t5's sentinel ids), when known

    def train_source(self, rank: int = 0, world: int = 1) -> BatchSource:
        raise NotImplementedError

    def val_sources(self) -> dict[str, Objective] | None:
        """A data mixture's sources, each as this objective on that source's splits, for
        val/loss/<source>; None for one source."""
        parts = getattr(self.splits, "parts", None)
        if parts is None:
            return None
        views = {}
        for name, part in zip(self.splits.names, parts, strict=True):
            views[name] = copy.copy(self)
            views[name].splits = part
        return views

    def windows_by_source(self, n: int) -> dict[str, int] | None:
        """How many of the first n training windows (all ranks) each mixture source gave; None
        for one source. A function of n, so the counts are exact after a resume."""
        mixed = getattr(self.splits, "train", None)
        if not hasattr(mixed, "schedule"):
            return None
        return dict(zip(mixed.names, mixed.schedule(self.seed).counts(n).tolist(), strict=True))

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


# ----------------------------------------------------------------------------- encoder-decoder


def seq2seq_batch(pairs: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """(encoder input, target) id pairs -> input_ids (+ attention_mask when padded),
    decoder_input_ids (the target shifted right after the start id, pad as in T5) and labels
    (-100 on padding)."""
    B = len(pairs)
    S = max(len(x) for x, _ in pairs)
    T = max(len(y) for _, y in pairs)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    dec = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for r, (x, y) in enumerate(pairs):
        ids[r, : len(x)], mask[r, : len(x)] = x, 1
        labels[r, : len(y)] = y
        dec[r, 1 : len(y)] = y[:-1]
    batch = {"input_ids": ids, "decoder_input_ids": dec, "labels": labels}
    if not bool(mask.all()):  # full rows (packed pretraining) need no mask: faster attention
        batch["attention_mask"] = mask
    return batch


def encoder_decoder_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    logits = model(batch["input_ids"], batch.get("attention_mask"), decoder_input_ids=batch["decoder_input_ids"])
    loss, n = token_cross_entropy(logits, batch["labels"])
    return LossOutput(loss=loss, n_targets=n)


class CorruptedWindows:
    """Training batches of a denoising objective: raw windows (PackedWindows) turned into
    (input, target) rows by `rows(windows, generator)`, the generator keyed by (seed, key,
    step, rank), so a batch is a function of the step."""

    def __init__(self, windows, rows, seed: int, key: int, rank: int):
        self.windows, self.rows, self.seed, self.key, self.rank = windows, rows, seed, key, rank

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        from llmtrain.data.loader import step_generator

        w = self.windows.batch(step)
        raw = torch.cat([w["input_ids"], w["labels"][:, -1:]], dim=1)
        return self.rows(list(raw), step_generator(self.seed, self.key, step, self.rank))
