"""Cross-entropy of the LM head without the full [tokens, vocab] logits (trainer.chunked_loss).

At a 50k vocabulary the fp32 logits of 4 x 512 tokens are 400 MB, and the plain path keeps them,
their log-softmax and two gradients of their size alive at once. Here the head is applied to
`chunk` rows at a time, and each chunk's logits are turned at once into the loss and, when a
backward will follow, into the gradients of the hidden states, the head weight and its bias for
an upstream gradient of 1 (the loss is the graph's end: backward only scales them). Memory no
longer grows with the vocabulary, and no logits are recomputed: the same three head matmuls as
the plain path (Liger's fused linear cross-entropy does the same on GPU). PyTorch has no such op
on CPU, hence the autograd.Function.

The head weight's gradient (vocab x d, 155 MB at gpt2_124m) is then alive through the whole
backward, while every block's activations are: the step's peak. `defer_head_gradient`
(trainer.defer_head_grad) forms it instead at the end of the backward, when the activations are
gone: a node on the input embedding's output (`HeadGradientCarrier`) runs after the last block's
backward and computes it again from the saved hidden states, a chunk at a time (a fourth head
matmul). It is ordinary autograd, so DDP and FSDP see the gradient arrive as any other.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.objectives.base import token_cross_entropy

IGNORE = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB in fp32, whatever the vocabulary


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def chunk_terms(h, y, weight, bias, want_grad: bool):
    """(summed cross-entropy, correct argmax predictions, d loss / d logits or None) of one chunk.
    The gradient is softmax - onehot(y), zero for ignored rows, in h's dtype."""
    logits = F.linear(h, weight, bias).float()
    valid = y != IGNORE
    target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
    row_max, best = logits.max(-1)
    correct = ((best == y) & valid).sum()
    # logsumexp as torch computes it, but in place in the logits: one chunk-sized buffer is alive
    # at a time, and its exp serves the gradient too
    e = logits.sub_(row_max[:, None]).exp_()
    sum_exp = e.sum(-1)
    loss = torch.where(valid, row_max + sum_exp.log() - target, 0.0).sum()
    if not want_grad:
        return loss, correct, None
    g = e.div_(sum_exp[:, None])
    g.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(g[:, :1]))
    g *= valid[:, None]
    return loss, correct, g.to(h.dtype)


class _Deferred:
    """One loss's share of a deferred head-weight gradient: what recomputing it needs."""

    def __init__(self, hidden, weight, bias, labels, chunk):
        self.args, self.chunk, self.scale = (hidden, weight, bias, labels), chunk, None

    def weight_grad(self) -> torch.Tensor:
        hidden, weight, bias, labels = self.args
        d_weight = torch.zeros_like(weight, dtype=torch.float32)
        for s in range(0, hidden.shape[0], self.chunk):
            h = hidden[s : s + self.chunk]
            _, _, g = chunk_terms(h, labels[s : s + self.chunk], weight, bias, True)
            d_weight.addmm_(g.t().float(), h.float())  # the order and ops of the undeferred path
            del g
        return d_weight.mul_(self.scale).to(weight.dtype)


class HeadGradientCarrier(torch.autograd.Function):
    """Identity on the input embedding's output x that also takes the head weight: its backward
    runs once the blocks' backward is done, and returns the head weight's gradient for the losses
    that deferred it to `pending` (see defer_head_gradient). The second output is a token each
    such loss takes as an input, so that this backward waits for theirs."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, pending: list):
        ctx.pending = pending
        return x.view_as(x), x.new_zeros(())

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_x, _grad_token):
        pending, ctx.pending = ctx.pending, []
        d_weight = None
        for share in pending:
            if share.scale is None:  # its loss was not part of this backward
                continue
            g = share.weight_grad()
            share.args = None  # the saved hidden states, freed now
            d_weight = g if d_weight is None else d_weight.add_(g)
        return grad_x, d_weight, None


# head module -> its HeadGradient; weak, so a discarded model leaves nothing behind
_DEFERRALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class HeadGradient:
    """Forward hook on a model's input embedding: under grad, places a HeadGradientCarrier with
    the head weight on its output, for the next chunked loss over this head to defer to."""

    def __init__(self, head: nn.Linear):
        self.head, self.pending = head, None

    def __call__(self, module, args, output):
        weight = self.head.weight
        if not (torch.is_grad_enabled() and weight.requires_grad and weight.numel() > CHUNK_ELEMENTS):
            self.pending = None  # a head no bigger than one chunk: deferring would save nothing
            return None
        shares: list = []
        output, token = HeadGradientCarrier.apply(output, weight, shares)
        self.pending = (token, shares)
        return output

    def take(self):
        pending, self.pending = self.pending, None
        return pending


def defer_head_gradient(model: nn.Module) -> bool:
    """Form the LM head weight's gradient at the end of the backward, not at its start (the module
    docstring says why). Needs the model's get_input_embeddings/get_output_embeddings and a plain
    nn.Linear head; True if installed (or already). Not under torch.compile: the hook keeps
    Python state between the embedding and the loss."""
    embed = getattr(model, "get_input_embeddings", None)
    head = getattr(model, "get_output_embeddings", None)
    if embed is None or head is None or type(head()) is not nn.Linear:
        return False
    head = head()
    if head not in _DEFERRALS:
        _DEFERRALS[head] = HeadGradient(head)
        embed().register_forward_hook(_DEFERRALS[head])
    return True


class ChunkedCrossEntropy(torch.autograd.Function):
    """(sum of cross-entropy over labels != -100, correct argmax predictions) of
    linear(hidden, weight, bias) against labels; hidden [N, d], labels [N]. `grads`: compute the
    gradients in forward (pass torch.is_grad_enabled(): under no_grad they would be wasted).
    `shares`, `token`: a HeadGradientCarrier's (defer_head_gradient); the weight's gradient is then
    left to it."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, labels, chunk: int, grads: bool, shares=None, token=None):
        need_h, need_w, need_b = (grads and n for n in ctx.needs_input_grad[:3])
        need_b = need_b and bias is not None
        ctx.share = None
        if need_w and shares is not None:
            ctx.share = _Deferred(hidden, weight, bias, labels, chunk)
            shares.append(ctx.share)
            need_w = False
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        correct = torch.zeros((), device=hidden.device, dtype=torch.long)
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        w = weight.to(hidden.dtype) if need_h else None  # once, not per chunk (a copy under autocast)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            ce, right, g = chunk_terms(h, labels[s : s + chunk], weight, bias, need_h or need_w or need_b)
            loss += ce
            correct += right
            if g is not None:
                if need_h:
                    d_hidden[s : s + chunk] = g @ w
                if need_w:
                    d_weight.addmm_(g.t().float(), h.float())
                if need_b:
                    d_bias += g.float().sum(0)
                del g  # before the next chunk's
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
        if ctx.share is not None:
            ctx.share.scale = grad_loss  # the carrier forms the weight's gradient later
            ctx.share = None  # the carrier holds it; this node may outlive the backward
        if d_hidden is not None:
            d_hidden.mul_(grad_loss.to(d_hidden.dtype))
        if d_weight is not None:
            d_weight = d_weight.mul_(grad_loss).to(w_dtype)
        if d_bias is not None:
            d_bias = d_bias.mul_(grad_loss).to(b_dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None


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
        deferral = _DEFERRALS.get(head) if grads else None
        token, shares = (deferral.take() if deferral is not None else None) or (None, None)
        ce, correct = ChunkedCrossEntropy.apply(features, head.weight, head.bias, labels, rows, grads, shares, token)
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
