"""Causal language modelling: predict token t+1 from tokens <= t on packed windows."""
from __future__ import annotations

from llmtrain.data.loader import PackedWindows, sequential_windows
from llmtrain.objectives.base import LossOutput, Objective, token_cross_entropy
from llmtrain.registry import register


@register("objective", "clm")
class CausalLM(Objective):
    name = "clm"
    decoder_only = True

    def train_source(self, splits, data, seed, rank=0, world_size=1):
        return PackedWindows(splits.train, data.seq_len, data.batch_size, seed, rank, world_size)

    def val_batches(self, splits, data, max_batches=0, rank=0, world_size=1, seed=0):
        return sequential_windows(splits.val, data.seq_len, data.batch_size, max_batches, rank, world_size)

    def loss(self, model, batch):
        logits = model(batch["input_ids"])
        loss, n = token_cross_entropy(logits, batch["labels"])
        return LossOutput(loss=loss, n_targets=n)
