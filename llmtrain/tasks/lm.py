"""`lm`: continue causal-LM training on data.path (the default task; what `finetune` did before
tasks existed). Delegates to the clm objective; evaluate() reports loss / perplexity."""

from __future__ import annotations

import math

from llmtrain.config.schema import ObjectiveConfig
from llmtrain.data.corpus import TokenSplits, read_split, tokenize_split
from llmtrain.objectives.clm import CausalLM
from llmtrain.registry import register
from llmtrain.tasks.base import Task


@register("task", "lm")
class LanguageModeling(Task):
    name = "lm"
    needs_decoder = True
    token_loss = True

    def __init__(self, cfg, tokenizer, model_cfg, data_cfg, state=None, seed=0, splits: TokenSplits | None = None):
        """`splits`: the token splits of data.path (finetune passes its cached corpus); without
        them data.path is read and split on first use (a checkpoint loaded for evaluation)."""
        super().__init__(cfg, tokenizer, model_cfg, data_cfg, state, seed)
        self._splits = splits
        self._objective: CausalLM | None = None

    @property
    def splits(self) -> TokenSplits:
        if self._splits is None:
            self._splits = tokenize_split(read_split(self.data_cfg), self.tokenizer)
        return self._splits

    @property
    def objective(self) -> CausalLM:
        if self._objective is None:
            self._objective = CausalLM(
                ObjectiveConfig(name="clm"), self.tokenizer, self.splits, self.data_cfg, self.seed
            )
        return self._objective

    def train_source(self, rank=0, world=1):
        return self.objective.train_source(rank, world)

    def val_batches(self, max_batches=0, rank=0, world=1):
        return self.objective.val_batches(max_batches, rank, world)

    def loss(self, model, batch):
        self.objective.chunked_loss = self.chunked_loss
        return self.objective.loss(model, batch)

    def train_examples(self):
        return self.splits.train

    def val_examples(self):
        return self.splits.val

    def summary(self) -> str:
        s = self.splits
        return f"task lm: {s.describe()} of {self.data_cfg.path}"

    def evaluate(self, model, device=None, max_examples=0):
        loss = self.val_loss(model, device, max_batches=max_examples)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}
