"""Causal language modelling: predict token t+1 from tokens <= t on packed windows."""

from __future__ import annotations

from llmtrain.data.loader import sequential_windows
from llmtrain.data.mixture import train_windows
from llmtrain.data.streaming import StreamWindows, TokenStream
from llmtrain.objectives.base import LossOutput, Objective, token_cross_entropy
from llmtrain.registry import register


@register("objective", "clm")
class CausalLM(Objective):
    name = "clm"
    needs_decoder = True
    supports_mixture = True

    def train_source(self, rank=0, world=1):
        d = self.data_cfg
        if isinstance(self.splits.train, TokenStream):  # data.streaming: read in order, on the fly
            return StreamWindows(self.splits.train, d.seq_len, d.batch_size, rank, world)
        return train_windows(self.splits.train, d.seq_len, d.batch_size, self.seed, rank, world)

    def val_batches(self, max_batches=0, rank=0, world=1):
        d = self.data_cfg
        return sequential_windows(self.splits.val, d.seq_len, d.batch_size, max_batches, rank, world)

    def loss(self, model, batch):
        logits = model(batch["input_ids"])
        loss, n = token_cross_entropy(logits, batch["labels"])
        return LossOutput(loss=loss, n_targets=n)
