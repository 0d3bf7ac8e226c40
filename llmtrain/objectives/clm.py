"""Causal language modelling: predict token t+1 from tokens <= t on packed windows
(data.document_mask=true: from the tokens <= t of the same document, llmtrain/data/documents.py)."""

from __future__ import annotations

from llmtrain.data.documents import DocumentWindows, document_kwargs, mark_documents
from llmtrain.data.loader import sequential_windows
from llmtrain.data.mixture import train_windows
from llmtrain.data.streaming import StreamWindows, TokenStream
from llmtrain.objectives.base import LossOutput, Objective
from llmtrain.objectives.chunked_ce import lm_loss
from llmtrain.registry import register


@register("objective", "clm")
class CausalLM(Objective):
    name = "clm"
    needs_decoder = True
    supports_mixture = True

    def train_source(self, rank=0, world=1):
        d = self.data_cfg
        if isinstance(self.splits.train, TokenStream):  # data.streaming: read in order, on the fly
            windows = StreamWindows(self.splits.train, d.seq_len, d.batch_size, rank, world)
        else:
            windows = train_windows(self.splits.train, d.seq_len, d.batch_size, self.seed, rank, world)
        return DocumentWindows(windows, self.tokenizer.eos_id) if d.document_mask else windows

    def val_batches(self, max_batches=0, rank=0, world=1):
        d = self.data_cfg
        batches = sequential_windows(self.splits.val, d.seq_len, d.batch_size, max_batches, rank, world)
        if d.document_mask:
            return (mark_documents(b, self.tokenizer.eos_id) for b in batches)
        return batches

    def loss(self, model, batch):
        hidden = model.encode(batch["input_ids"], **document_kwargs(batch))
        loss, n = lm_loss(model, hidden, batch["labels"], self.chunked_loss)
        return LossOutput(loss=loss, n_targets=n)
