"""Cross-entropy of the LM head without the full [tokens, vocab] logits (trainer.chunked_loss).

At a 50k vocabulary the fp32 logits of 4 x 512 tokens are 400 MB, and the plain path keeps them,
their log-softmax and two gradients of their size alive at once. Here the head is applied to
`chunk` rows at a time, and each chunk's logits are turned at once into the loss and, when a
backward will follow, into the gradients of the hidden states, the head weight and its bias for
an upstream gradient of 1 (the loss is the graph's end: backward only scales them). Memory no
longer grows with the vocabulary, and no logits are recomputed: the same three head matmuls as
the plain path (Liger's fused linear cross-entropy does the same on GPU). PyTorch has no such op
on CPU, hence the autograd.Function.
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
    linear(hidden, weight, bias) against labels; hidden [N, d], labels [N]. `grads`: compute the
    gradients in forward (pass torch.is_grad_enabled(): under no_grad they would be wasted)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, labels, chunk: int, grads: bool):
        need_h, need_w, need_b = (grads and n for n in ctx.needs_input_grad[:3])
        need_b = need_b and bias is not None
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        correct = torch.zeros((), device=hidden.device, dtype=torch.long)
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        w = weight.to(hidden.dtype) if need_h else None  # once, not per chunk (a copy under autocast)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], labels[s : s + chunk]
            logits = F.linear(h, weight, bias).float()
            valid = y != IGNORE
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
            row_max, best = logits.max(-1)
            correct += ((best == y) & valid).sum()
            # logsumexp as torch computes it, but in place in the logits: one chunk-sized buffer
            # is alive at a time, and its exp serves the gradient too
            e = logits.sub_(row_max[:, None]).exp_()
            sum_exp = e.sum(-1)
            loss += torch.where(valid, row_max + sum_exp.log() - target, 0.0).sum()
            if need_h or need_w or need_b:
                # d(lse - logit_y)/d logits = softmax - onehot(y), zero for ignored rows
                g = e.div_(sum_exp[:, None])
                g.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(g[:, :1]))
                g *= valid[:, None]
                g = g.to(h.dtype)
                if need_h:
                    d_hidden[s : s + chunk] = g @ w
                if need_w:
                    d_weight.addmm_(g.t().float(), h.float())
                if need_b:
                    d_bias += g.float().sum(0)
                del g
            del logits, e  # before the next chunk's
        # kept on ctx, not saved tensors: backward scales them in place (no second copy)
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss, _grad_correct):
        if ctx.grads is None:
            raise RuntimeError("the chunked cross-entropy's gradients were used by an earlier backward")
        d_hidden, d_weight, d_bias = ctx.grads
        ctx.grads = None  # handed over: nothing else holds them after this backward
        w_dtype, b_dtype = ctx.dtypes
        if d_hidden is not None:
            d_hidden.mul_(grad_loss.to(d_hidden.dtype))
        if d_weight is not None:
            d_weight = d_weight.mul_(grad_loss).to(w_dtype)
        if d_bias is not None:
            d_bias = d_bias.mul_(grad_loss).to(b_dtype)
        return d_hidden, d_weight, d_bias, None, None, None


def head_cross_entropy(
    features: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunked: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, correct predictions, counted targets) of head(features) against
    labels (-100: not counted). `features`: what the head sees (model.lm_head_parts). A head that
    is not a plain nn.Linear (LoRA, quantized) always takes the plain path."""
    features, labels = features.reshape(-1, features.shape[-1]), labels.reshape(-1)
    n = (labels != IGNORE).sum()
    if chunked and type(head) is nn.Linear:
        rows, grads = chunk_rows(head.out_features), torch.is_grad_enabled()
        ce, correct = ChunkedCrossEntropy.apply(features, head.weight, head.bias, labels, rows, grads)
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
