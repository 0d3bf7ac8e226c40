"""`lm`: continue causal-LM training on data.path (the default task; what `finetune` did before
tasks existed). Delegates to the clm objective; evaluate() reports loss / perplexity."""
from __future__ import annotations

import math

from llmtrain.data.corpus import TokenSplits, split_tokens
from llmtrain.data.sources import read_documents
from llmtrain.objectives.clm import CausalLM
from llmtrain.config.schema import ObjectiveConfig
from llmtrain.registry import register
from llmtrain.tasks.base import Task


@register("task", "lm")
class LanguageModeling(Task):
    name = "lm"
    needs_decoder = True

    def __init__(self, cfg, tokenizer, model_cfg, data_cfg, state=None):
        super().__init__(cfg, tokenizer, model_cfg, data_cfg, state)
        self.objective = CausalLM(ObjectiveConfig(name="clm"), tokenizer)
        self.splits: TokenSplits | None = None

    def get_splits(self, splits=None) -> TokenSplits:
        if splits is not None:
            self.splits = splits
        if self.splits is None:
            d = self.data_cfg
            docs = read_documents(d.path, d.text_field, d.encoding_errors, d.doc_pattern)
            self.splits = split_tokens(docs, self.tokenizer, d.val_fraction)
        return self.splits

    def train_source(self, splits, data_cfg, seed, rank=0, world_size=1):
        return self.objective.train_source(self.get_splits(splits), data_cfg, seed, rank, world_size)

    def val_batches(self, splits, data_cfg, max_batches=0, rank=0, world_size=1, seed=0):
        return self.objective.val_batches(self.get_splits(splits), data_cfg, max_batches, rank, world_size, seed)

    def loss(self, model, batch):
        return self.objective.loss(model, batch)

    def train_examples(self):
        return self.get_splits().train

    def val_examples(self):
        return self.get_splits().val

    def summary(self) -> str:
        s = self.get_splits()
        return f"task lm: {len(s.train):,} train / {len(s.val):,} val tokens of {self.data_cfg.path}"

    def evaluate(self, model, device=None, max_examples=0):
        loss = self.val_loss(model, device, max_batches=max_examples)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}
