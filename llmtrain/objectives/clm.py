"""Causal language modelling: predict token t+1 from tokens <= t on packed windows."""

from __future__ import annotations

from llmtrain.data.loader import PackedWindows, sequential_windows
from llmtrain.objectives.base import LossOutput, Objective
from llmtrain.objectives.chunked_ce import lm_loss
from llmtrain.registry import register


@register("objective", "clm")
class CausalLM(Objective):
    name = "clm"
    needs_decoder = True

    def train_source(self, rank=0, world=1):
        d = self.data_cfg
        return PackedWindows(self.splits.train, d.seq_len, d.batch_size, self.seed, rank, world)

    def val_batches(self, max_batches=0, rank=0, world=1):
        d = self.data_cfg
        return sequential_windows(self.splits.val, d.seq_len, d.batch_size, max_batches, rank, world)

    def loss(self, model, batch):
        loss, n = lm_loss(model, model.encode(batch["input_ids"]), batch["labels"], self.chunked_loss)
        return LossOutput(loss=loss, n_targets=n)
