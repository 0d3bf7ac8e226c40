"""Document boundaries of packed windows (data.document_mask=true).

A pretraining window is cut from the token stream, where every document ends with the eos
token, so its boundaries are derived from the window itself: the batch stays a function of the
step. A token's document id counts the eos tokens before it (an eos belongs to the document it
ends), and the target after an eos, the next document's first token, is ignored: it cannot be
predicted from a document the model no longer sees. SFT packing knows its examples and carries
their ids explicitly (tasks/generative.py). The models turn the ids into block-diagonal causal
attention and per-document positions (models/layers.py `document_inputs`).
"""

from __future__ import annotations

import torch


def mark_documents(batch: dict[str, torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    """The CLM batch with `document_ids` [B, T] and the label after each eos set to -100."""
    ends = batch["input_ids"] == eos_id
    return {
        **batch,
        "document_ids": ends.cumsum(dim=1) - ends.long(),
        "labels": batch["labels"].masked_fill(ends, -100),
    }


class DocumentWindows:
    """A batch source whose batches carry their document boundaries (mark_documents)."""

    def __init__(self, source, eos_id: int):
        self.source, self.eos_id = source, eos_id

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return mark_documents(self.source.batch(step), self.eos_id)


def document_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's document_ids argument when the batch has them; nothing otherwise, so models
    without the argument are called as before."""
    return {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}
