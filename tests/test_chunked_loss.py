"""trainer.chunked_loss: the chunked LM-head cross-entropy gives the plain path's loss and gradients
(fp32, 1e-6), for the op itself and through the clm (gpt2, llama), mlm (bert) and instruction losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


class HeadShapedOutputs(TorchDispatchMode):
    """Records, in order, every op whose output has the head weight's shape (its gradient's
    buffers), next to markers appended by hooks."""

    def __init__(self, shape, events):
        super().__init__()
        self.shape, self.events = tuple(shape), events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.events.append(f"head-shaped {func.overloadpacket.__name__}")
        return out


def head_gradient_run(arch: str, objective: str, defer: bool):
    """(every parameter's gradient, the events of one forward + backward) of a small model whose
    head is larger than one chunk; 'blocks done' marks the gradient reaching the first block's input."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        name=arch, n_layer=2, n_head=2, d_model=32, max_seq_len=32, vocab_size=320, tie_embeddings=arch != "llama"
    )
    model = build_model(cfg)
    if defer:
        assert chunked_ce.defer_head_gradient(model)
    trainee = build_objective(ObjectiveConfig(name=objective), TOK, splits(), DataConfig(seq_len=32, batch_size=4), 0)
    trainee.chunked_loss = True
    events: list[str] = []

    def mark(_module, args):  # returns None: the block's inputs stay as they are
        args[0].register_hook(lambda g: events.append("blocks done"))

    model.blocks[0].register_forward_pre_hook(mark)
    with HeadShapedOutputs(model.get_output_embeddings().weight.shape, events):
        trainee.loss(model, trainee.train_source().batch(0)).loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}, events


@pytest.mark.parametrize("arch,objective", [("gpt2", "clm"), ("llama", "clm"), ("bert", "mlm")])
def test_deferred_head_gradient_is_formed_after_the_blocks_and_is_exact(arch, objective, monkeypatch):
    """defer_head_gradient (trainer.defer_head_grad=true): the head weight's
    gradient is formed only once the blocks' backward is done, when their activations are freed,
    and every gradient equals the undeferred chunked path's bit for bit (tied heads: gpt2, bert;
    an untied one: llama)."""
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 2000)  # 320 x 32 head: five chunks' worth
    early, early_events = head_gradient_run(arch, objective, defer=False)
    late, late_events = head_gradient_run(arch, objective, defer=True)
    first = next(i for i, e in enumerate(early_events) if e.startswith("head-shaped"))
    assert first < early_events.index("blocks done")  # formed by the loss, before the blocks' backward
    assert all(late_events.index("blocks done") < i for i, e in enumerate(late_events) if e.startswith("head-shaped"))
    assert early.keys() == late.keys() and sum(g is not None for g in early.values()) > 5
    for k in early:  # bert's pooler and NSP head have none in mlm
        assert (early[k] is None and late[k] is None) or torch.equal(early[k], late[k]), k


def test_deferral_costs_one_head_matmul_and_nothing_without_grad(monkeypatch):
    """Deferred, each chunk costs four head matmuls (the logits again at the end); under no_grad
    the hook places nothing and the loss is its one matmul per chunk."""
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 320 * 8)  # 8 rows per chunk
    torch.manual_seed(0)
    cfg = ModelConfig(name="gpt2", n_layer=1, n_head=2, d_model=16, max_seq_len=16, vocab_size=320)
    model = build_model(cfg)
    ids = torch.randint(5, 300, (2, 16))  # 32 rows: 4 chunks
    head = model.get_output_embeddings()

    def head_matmuls(grad: bool) -> int:
        hidden = model.encode(ids).detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad), CountMatmuls() as count:
            model.get_input_embeddings()(ids)  # the hook's forward, as inside encode
            ce, _, _ = chunked_ce.head_cross_entropy(hidden, head, ids, chunked=True)
            if grad:
                ce.backward()
        return count.calls

    assert chunked_ce.defer_head_gradient(model)
    assert head_matmuls(False) == 4
    assert head_matmuls(True) == 4 * 4
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_heads_deferral_cannot_serve_are_left_alone():
    """Not a plain nn.Linear head (LoRA, quantized) or no embedding accessors: not installed."""
    model = build_model(ModelConfig(name="gpt2", n_layer=1, n_head=2, d_model=16, max_seq_len=16, vocab_size=320))
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(16, 320))
    assert not chunked_ce.defer_head_gradient(model)
    assert not chunked_ce.defer_head_gradient(torch.nn.Linear(4, 4))


def test_deferred_gradients_reach_ddp_and_fsdp():
    """Two gloo ranks under torchrun: DDP's and FSDP's synchronised gradients of every parameter
    are the same with and without the deferral (tests/distributed_head_gradient.py)."""
    script = Path(__file__).with_name("distributed_head_gradient.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in ("ddp gpt2", "ddp llama", "fsdp gpt2", "fsdp llama"):
        assert f"{case}: " in proc.stdout and "gradients equal" in proc.stdout, proc.stdout


def test_pretrain_trains_with_the_deferral_and_finetuning_a_classifier_refuses_it(tmp_path, pretrained):
    """trainer.defer_head_grad=true through the CLI: pretrain runs with it to its last step; a
    sequence classifier has no LM head to defer, so finetune task=classification is refused in
    one line, exit 2, naming the key."""
    from conftest import TINY, assert_user_error, run_cli, sst2_split

    run = tmp_path / "pre"
    proc = run_cli("pretrain", *TINY, "trainer.max_steps=5", "trainer.defer_head_grad=true", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 5" in proc.stdout, proc.stdout[-2000:]  # (non-finite steps would have stopped it: exit 2)
    train, dev = sst2_split(tmp_path)
    refused = run_cli(
        "finetune",
        f"init_from={pretrained}",
        "task=classification",
        f"task.train_path={train}",
        f"task.val_path={dev}",
        "task.text_field=sentence",
        "trainer.max_steps=2",
        "trainer.defer_head_grad=true",
        f"hydra.run.dir={tmp_path / 'ft'}",
    )
    assert_user_error(refused, "trainer.defer_head_grad=true", "SequenceClassifier has no plain linear LM head")
