"""Freeze the trainable parameters a trainee's loss never reaches (BERT's NSP head and pooler
under objective=mlm, the MLM/NSP heads under a classification head or contrastive training).

Such parameters get no gradient, so the optimizer keeps no state for them and a resumed run
could not restore one; DDP also requires every trainable parameter to be used. Freezing them
changes no update: AdamW skips a parameter without a gradient, weight decay included.
"""

from __future__ import annotations

import torch


def freeze_unused(model: torch.nn.Module, trainee, keep_rng: bool = True) -> list[str]:
    """Probe one training batch's backward pass and freeze what got no gradient; returns the
    frozen names. keep_rng: the probe's dropout draws do not move the run's random stream."""
    batch = trainee.train_source().batch(0)
    with torch.random.fork_rng(devices=[], enabled=keep_rng):
        trainee.loss(model, batch).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    return unused


def frozen_prefixes(names: list[str]) -> str:
    """'encoder.pooler, nsp_head' for the frozen tensors' modules, in order."""
    return ", ".join(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
