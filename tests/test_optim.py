"""Optimizers: Muon's orthogonalisation, MuonAdamW against torch's AdamW, the on-device skip of
non-finite steps, fused AdamW by default on CPU, and a Muon run that trains and resumes exactly
through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_cli
from llmtrain.config.schema import ModelConfig, OptimConfig
from llmtrain.errors import UserError
from llmtrain.models import build_model
from llmtrain.train.optim import MuonAdamW, build_optimizer, orthogonalize


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])  # wide and tall (transposed inside)
def test_orthogonalize_flattens_the_spectrum(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 50  # one dominant direction, as momentum tends to have
    s_in = torch.linalg.svdvals(g)
    s = torch.linalg.svdvals(orthogonalize(g, 5))
    assert s_in.max() / s_in.min() > 20
    # Muon's quintic trades exactness for speed: singular values land in about [0.7, 1.2].
    assert s.min() > 0.5 and s.max() < 1.3, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(orthogonalize(g, 5).flatten(), (u @ vh).flatten(), dim=0)
    assert cos > 0.95  # it approximates U V^T, not just any well-conditioned matrix


def _tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="gpt2", vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=8))


def _loss(model, x):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), x.view(-1))


def test_muon_groups_and_adamw_part_match_torch():
    """Muon takes the blocks' matrices only; with muon_lr=0 (they stay put) every other
    parameter must follow torch's AdamW exactly, moments and bias correction included."""
    model, ref = _tiny_model(), _tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-2, weight_decay=0.1, muon_lr=0.0), "cpu")
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names and all(n.startswith("blocks.") and model.get_parameter(n).ndim == 2 for n in names)
    assert not any("wte" in n or "wpe" in n for n in names)  # embeddings / tied head stay on AdamW
    ref_params = dict(ref.named_parameters())
    groups = [
        {
            "params": [ref_params[n] for n, p in model.named_parameters() if any(p is q for q in g["params"])],
            "weight_decay": g["weight_decay"],
        }
        for g in opt.param_groups
        if not g["muon"]
    ]
    ref_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(3):  # the same gradients into both (of shrinking size: bias correction matters)
        for n, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=g) * 10.0**-i
            ref_params[n].grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for n, p in model.named_parameters():
        if n in names:
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), f"{n} did not move"
            assert torch.allclose(p, ref_params[n], rtol=0, atol=1e-7), (n, (p - ref_params[n]).abs().max())


def test_muon_moves_the_hidden_matrices_by_an_orthogonal_step():
    model = _tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon", weight_decay=0.0, muon_lr=0.02, muon_momentum=0.0), "cpu")
    x = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, x).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    w = (
        "blocks.0.mlp.fc.weight"
        if "blocks.0.mlp.fc.weight" in before
        else next(n for n in before if n.startswith("blocks.0") and before[n].ndim == 2)
    )
    step = before[w] - model.get_parameter(w).detach()
    # momentum 0: the step is -lr * scale * orthogonalize(grad), whose singular values are ~1
    scale = 0.02 * max(1.0, step.size(0) / step.size(1)) ** 0.5
    assert torch.allclose(step, scale * orthogonalize(grads[w], 5), atol=1e-6)
    s = torch.linalg.svdvals(step / scale)
    assert s.max() < 1.3 and s.median() > 0.5


def test_found_inf_skips_the_step_on_device():
    model = _tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon"), "cpu")
    x = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    _loss(model, x).backward()
    opt.step()  # state exists
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _loss(model, x).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


def test_adamw_is_fused_on_cpu_and_takes_the_foreach_steps():
    """optim.fused unset: torch's fused AdamW on CPU too (one pass, no temporary the size of a
    parameter group); it follows the foreach AdamW it replaced to float rounding."""
    model, ref = _tiny_model(), _tiny_model()
    opt = build_optimizer(model, OptimConfig(), "cpu")
    old = build_optimizer(ref, OptimConfig(fused=False), "cpu")
    assert opt.defaults["fused"] and not opt.defaults["foreach"]
    assert old.defaults["foreach"] and not old.defaults["fused"]
    x = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for m, o in ((model, opt), (ref, old)):
            o.zero_grad(set_to_none=True)
            _loss(m, x).backward()
            o.step()
    moved = max((a - b).abs().max() for a, b in zip(model.parameters(), _tiny_model().parameters()))
    assert moved > 1e-3  # the steps were taken
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="optim.name 'sgd'"):
        build_optimizer(_tiny_model(), OptimConfig(name="sgd"), "cpu")


def test_muon_pretrain_trains_and_resumes_exactly(tmp_path):
    base = [
        *TINY,
        "optim=muon",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.eval_batches=2",
        "scheduler.name=constant",
        "scheduler.warmup_steps=0",
        "trainer.ckpt_every=5",
    ]

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_cli("pretrain", *base, "trainer.max_steps=10", f"hydra.run.dir={ref}").returncode == 0
    assert run_cli("pretrain", *base, "trainer.max_steps=5", f"hydra.run.dir={cut}").returncode == 0
    proc = run_cli("pretrain", *base, "trainer.max_steps=10", "trainer.resume=auto", f"hydra.run.dir={cut}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    want, got = losses(ref), losses(cut)
    assert want[10] < want[1] - 0.2, want
    assert got == want  # the momentum buffers and AdamW moments came back exactly
