"""Cross-entropy of the LM head without the full [tokens, vocab] logits (trainer.chunked_loss).

At a 50k vocabulary the fp32 logits of 4 x 512 tokens are 400 MB, and the plain path keeps them,
their softmax and their gradient alive at once. Here the head is applied to `chunk` rows at a
time: forward keeps only each row's log-sum-exp, backward recomputes the chunk's logits and turns
them straight into the gradients of the hidden states, the head weight and its bias. One extra
head matmul per chunk buys memory that no longer grows with the vocabulary. PyTorch has no such
op (torch.compile fuses some of it on GPU, not on CPU), hence the autograd.Function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.objectives.base import token_cross_entropy

IGNORE = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB in fp32, whatever the vocabulary


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class ChunkedCrossEntropy(torch.autograd.Function):
    """(sum of cross-entropy over labels != -100, correct argmax predictions) of
    linear(hidden, weight, bias) against labels; hidden [N, d], labels [N]."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, labels, chunk: int):
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        correct = torch.zeros((), device=hidden.device, dtype=torch.long)
        lse = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s : s + chunk], weight, bias).float()
            y = labels[s : s + chunk]
            valid = y != IGNORE
            lse[s : s + chunk] = row_lse = torch.logsumexp(logits, -1)
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
            loss += torch.where(valid, row_lse - target, 0.0).sum()
            correct += ((logits.argmax(-1) == y) & valid).sum()
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss, _grad_correct):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros_like(weight, dtype=torch.float32)
        d_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], labels[s : s + chunk]
            logits = F.linear(h, weight, bias).float()
            # d(lse - logit_y)/d logits = softmax - onehot(y), zero for ignored rows
            g = torch.exp(logits - lse[s : s + chunk, None])
            valid = y != IGNORE
            g.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(g[:, :1]))
            g *= (valid * grad_loss)[:, None]
            g = g.to(h.dtype)
            d_hidden[s : s + chunk] = g @ weight.to(h.dtype)
            d_weight.addmm_(g.t().float(), h.float())
            if d_bias is not None:
                d_bias += g.float().sum(0)
        d_bias = None if d_bias is None else d_bias.to(bias.dtype)
        return d_hidden, d_weight.to(weight.dtype), d_bias, None, None


def head_cross_entropy(
    features: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunked: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, correct predictions, counted targets) of head(features) against
    labels (-100: not counted). `features`: what the head sees (model.lm_head_parts). A head that
    is not a plain nn.Linear (LoRA, quantized) always takes the plain path."""
    features, labels = features.reshape(-1, features.shape[-1]), labels.reshape(-1)
    n = (labels != IGNORE).sum()
    if chunked and type(head) is nn.Linear:
        ce, correct = ChunkedCrossEntropy.apply(features, head.weight, head.bias, labels, chunk_rows(head.out_features))
        return ce, correct, n
    logits = head(features)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
    return ce, correct, n


def lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunked: bool):
    """Mean token cross-entropy of the model's LM head over hidden states, and the target count:
    what token_cross_entropy(model.lm_logits(hidden), labels) gives, chunked or not."""
    features, head = model.lm_head_parts(hidden)
    if not (chunked and type(head) is nn.Linear):
        return token_cross_entropy(head(features), labels)
    ce, _, n = head_cross_entropy(features, head, labels, chunked)
    return ce / n.clamp(min=1), n
