"""trainer.chunked_loss: the chunked LM-head cross-entropy gives the plain path's loss and gradients
(fp32, 1e-6), for the op itself and through the clm (gpt2, llama), mlm (bert) and instruction losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmtrain.config.schema import DataConfig, ModelConfig, ObjectiveConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.models import build_model
from llmtrain.objectives import build_objective, chunked_ce
from llmtrain.objectives.chunked_ce import ChunkedCrossEntropy
from llmtrain.tokenizers.char import CharTokenizer

TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_op_matches_cross_entropy(bias):
    g = torch.Generator().manual_seed(0)
    n, d, v = 50, 16, 97
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    b = torch.randn(v, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(v, (n,), generator=g)
    labels[::7] = -100  # ignored rows, inside several chunks
    upstream = 0.37  # a scale other than 1 reaches every gradient
    loss, correct = ChunkedCrossEntropy.apply(hidden, weight, b, labels, 8, True)  # 7 chunks, the last short
    (loss * upstream).backward()
    got = [hidden.grad, weight.grad] + ([b.grad] if bias else [])
    for t in [hidden, weight] + ([b] if bias else []):
        t.grad = None
    logits = F.linear(hidden, weight, b)
    ref = F.cross_entropy(logits, labels, reduction="sum")
    (ref * upstream).backward()
    want = [hidden.grad, weight.grad] + ([b.grad] if bias else [])
    torch.testing.assert_close(loss / 43, ref.detach() / 43, **TOL)  # 43 counted rows: the mean
    assert correct.item() == ((logits.argmax(-1) == labels) & (labels != -100)).sum().item()
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **TOL)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        return func(*args, **(kwargs or {}))


def test_no_logits_recomputed_and_no_gradients_under_no_grad():
    """Forward + backward cost the plain path's three head matmuls per chunk (the gradients come
    from the forward pass); under no_grad (evaluation) forward is the loss's one matmul alone."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(97, 16, generator=g, requires_grad=True)
    labels = torch.randint(97, (50,), generator=g)
    with torch.no_grad(), CountMatmuls() as count:
        ChunkedCrossEntropy.apply(hidden, weight, None, labels, 8, torch.is_grad_enabled())
    assert count.calls == 7  # 7 chunks
    with CountMatmuls() as count:
        loss, _ = ChunkedCrossEntropy.apply(hidden, weight, None, labels, 8, torch.is_grad_enabled())
        loss.backward()
    assert count.calls == 3 * 7
    assert hidden.grad is not None and weight.grad is not None


TOK = CharTokenizer("".join(chr(0x4E00 + i) for i in range(300)))


def splits() -> TokenSplits:
    ids = np.random.default_rng(0).integers(max(TOK.special_ids) + 1, TOK.vocab_size, 4000).astype(np.uint16)
    return TokenSplits(train=ids, val=ids, n_docs=0, val_bytes=1)


def loss_and_grads(model, trainee, batch, chunked):
    model.zero_grad(set_to_none=True)
    trainee.chunked_loss = chunked
    out = trainee.loss(model, batch)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize(
    "arch,objective", [("gpt2", "clm"), ("llama", "clm"), ("bert", "mlm"), ("gpt2", "instruction")]
)
def test_objective_losses_match(arch, objective, monkeypatch):
    # 2000 logits per chunk: several chunks at vocab 320
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 2000)
    torch.manual_seed(0)
    cfg = ModelConfig(name=arch, n_layer=1, n_head=2, d_model=32, max_seq_len=32, vocab_size=320, tie_embeddings=True)
    model = build_model(cfg)
    data = DataConfig(seq_len=32, batch_size=4)
    if objective == "instruction":
        from llmtrain.tasks.generative import GenerativeTask

        trainee = GenerativeTask.__new__(GenerativeTask)  # only its loss is under test
        ids = torch.randint(5, 300, (4, 32))
        labels = torch.where(torch.arange(32) < 12, -100, ids)  # responses only, as the task builds them
        batch = {"input_ids": ids, "labels": labels}
    else:
        trainee = build_objective(ObjectiveConfig(name=objective), TOK, splits(), data, 0)
        batch = trainee.train_source().batch(0)
    plain, g_plain = loss_and_grads(model, trainee, batch, False)
    chunked, g_chunked = loss_and_grads(model, trainee, batch, True)
    torch.testing.assert_close(chunked.loss, plain.loss, **TOL)
    assert chunked.n_targets.item() == plain.n_targets.item() > 0
    for name, (c, _) in plain.extras.items():  # mlm accuracy
        assert chunked.extras[name][0].item() == c.item(), name
    assert g_plain.keys() == g_chunked.keys() and len(g_plain) > 3
    for k in g_plain:
        torch.testing.assert_close(g_chunked[k], g_plain[k], **TOL, msg=k)
