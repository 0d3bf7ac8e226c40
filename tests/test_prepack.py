"""llmtrain.models.prepack: decoding-time weight copies change neither the model nor its results."""

from __future__ import annotations

import pytest
import torch

from llmtrain.config.schema import ModelConfig
from llmtrain.generation import generate
from llmtrain.models import build_model, prepack


def _model(name: str):
    kw = dict(name=name, n_layer=2, n_head=4, d_model=64, max_seq_len=64, vocab_size=97)
    if name == "llama":
        kw["n_kv_heads"] = 2
    torch.manual_seed(0)
    return build_model(ModelConfig(**kw)).eval()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("onednn", [False, True])
def test_prepacked_keeps_logits_tokens_and_state(name, onednn, monkeypatch):
    if onednn:
        if not torch.backends.mkldnn.is_available():
            pytest.skip("no oneDNN in this torch build")
        monkeypatch.setattr(prepack, "ONEDNN_MIN_NUMEL", 0)  # tiny weights take the oneDNN path too
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    prompts = ids.tolist()
    with torch.inference_mode():
        plain = model(ids)
        with prepack.prepacked(model, rows=3):
            assert any("forward" in m.__dict__ for m in model.modules())  # it did take over
            fast = model(ids)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    # generate (which prepacks for >= MIN_NEW_TOKENS) gives the plain model's greedy tokens
    n = prepack.MIN_NEW_TOKENS + 4
    with_pack = generate(model, prompts, max_new_tokens=n, temperature=0.0).tokens
    monkeypatch.setattr(prepack, "MIN_NEW_TOKENS", 10**9)
    monkeypatch.setattr("llmtrain.generation.MIN_NEW_TOKENS", 10**9)
    without = generate(model, prompts, max_new_tokens=n, temperature=0.0).tokens
    assert with_pack == without
    # nothing is left behind: class forwards, same state-dict keys and values
    assert not any("forward" in m.__dict__ for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_prepacked_leaves_autocast_alone():
    model = _model("gpt2")
    with torch.autocast("cpu", dtype=torch.bfloat16), prepack.prepacked(model, rows=2):
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_no_copies_when_they_would_not_fit_in_memory(monkeypatch):
    """A model whose weights exceed COPY_MEMORY_SHARE of the available memory keeps the plain forward."""
    model = _model("gpt2")
    weights = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is torch.nn.Linear)
    monkeypatch.setattr(prepack, "available_memory", lambda: int(weights / prepack.COPY_MEMORY_SHARE) - 4)
    with torch.inference_mode(), prepack.prepacked(model, rows=2):
        assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setattr(prepack, "available_memory", lambda: int(weights / prepack.COPY_MEMORY_SHARE) + 4096)
    with torch.inference_mode(), prepack.prepacked(model, rows=2):
        assert any("forward" in m.__dict__ for m in model.modules())


def test_direct_calls_keep_results_hooks_and_classes():
    """The modules are called directly inside the block, the output is bit for bit the same, and
    every class and instance dict is restored on exit, an exception included. A model with a hook
    anywhere is left alone (a hook may swap parameters, as FSDP2's do), and its hook runs."""
    model = _model("llama")
    classes = {name: type(m) for name, m in model.named_modules()}
    dicts = {name: set(m.__dict__) for name, m in model.named_modules()}
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = model(ids)
        with prepack.direct_calls(model):
            attn = model.blocks[1].attn
            assert type(attn) is not classes["blocks.1.attn"] and isinstance(attn, classes["blocks.1.attn"])
            assert "qkv" in attn.__dict__  # found without Module.__getattr__
            fast = model(ids)
        assert torch.equal(fast, plain)
        with pytest.raises(RuntimeError, match="boom"), prepack.direct_calls(model):
            raise RuntimeError("boom")
        assert {name: type(m) for name, m in model.named_modules()} == classes
        assert {name: set(m.__dict__) for name, m in model.named_modules()} == dicts
        seen = []
        model.blocks[0].mlp.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        with prepack.direct_calls(model):
            assert {name: type(m) for name, m in model.named_modules()} == classes  # left alone
            assert torch.equal(model(ids), plain)
        assert len(seen) == 1


def test_rms_norm_fast_path_is_the_formula():
    """RMSNorm's fp32 path (torch's rms_norm) gives the HF formula's values bit for bit."""
    from llmtrain.models.layers import RMSNorm

    torch.manual_seed(3)
    for d, rows in ((64, 1), (768, 5), (100, 33)):
        norm = RMSNorm(d, 1e-5)
        norm.weight.data.normal_()
        x = torch.randn(rows, d) * 3
        formula = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
        assert torch.equal(norm(x), formula)


def test_rotary_roll_is_hf_rotate_half():
    """apply_rotary with Rotary's signed sin is HF's x * cos + rotate_half(x) * sin bit for bit."""
    from llmtrain.models.layers import Rotary, apply_rotary

    rotary = Rotary(64)
    pos = torch.arange(5, 12)[None].expand(2, 7)
    cos, signed_sin = rotary(pos, torch.float32)
    freqs = pos[..., None].float() * rotary.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    x = torch.randn(2, 6, 7, 64, generator=torch.Generator().manual_seed(4))
    x1, x2 = x.chunk(2, dim=-1)
    hf = x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()
    assert torch.equal(cos, emb.cos())
    assert torch.equal(apply_rotary(x, cos, signed_sin), hf)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows_out", [96, 97])  # 97: a last block that is not whole (like 50257)
def test_split_rows_linear_is_f_linear_bit_for_bit(bias, rows_out, monkeypatch):
    """One row times a large matrix, as a bmm over blocks of its rows: the same values exactly."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # forward reads it at each call
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows_out, 640, generator=g) * 0.02
    b = torch.randn(rows_out, generator=g) if bias else None
    f = prepack.split_rows_linear(w, b, parts=2)
    for shape in ((1, 1, 640), (1, 640), (3, 640)):  # a decoding step, a bare row, more rows (plain)
        x = torch.randn(*shape, generator=g)
        y = f(x)
        assert y.shape == shape[:-1] + (rows_out,)
        assert torch.equal(y, torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_one_row_decoding_splits_products_and_keeps_logits(name, monkeypatch):
    """prepacked(rows=1) with 2 threads: large weights take the split product (no copy), and a
    decoding step's logits and the greedy tokens are exactly the plain model's."""
    monkeypatch.setattr(prepack, "ONEDNN_MIN_NUMEL", 0)  # tiny weights count as large
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _model(name)
        ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            cache = model.new_kv_cache(1, 16)
            model(ids[:, :8], kv_cache=cache)
            plain = model(ids[:, 8:], kv_cache=cache)
            cache.crop(8)
            with prepack.prepacked(model, rows=1):
                assert model.lm_head.forward.__qualname__.startswith("split_rows_linear")
                fast = model(ids[:, 8:], kv_cache=cache)
        assert torch.equal(fast, plain)
        n = prepack.MIN_NEW_TOKENS + 4
        with_split = generate(model, ids.tolist(), max_new_tokens=n, temperature=0.0).tokens
        monkeypatch.setattr("llmtrain.generation.MIN_NEW_TOKENS", 10**9)
        assert generate(model, ids.tolist(), max_new_tokens=n, temperature=0.0).tokens == with_split
    finally:
        torch.set_num_threads(threads)


def test_split_products_need_no_memory_for_copies(monkeypatch):
    """With no memory to spare for copies, one-row decoding still splits its products (views)."""
    monkeypatch.setattr(prepack, "ONEDNN_MIN_NUMEL", 0)
    monkeypatch.setattr(prepack, "available_memory", lambda: 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model = _model("gpt2")
    with torch.inference_mode(), prepack.prepacked(model, rows=1):
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        assert all(m.forward.__qualname__.startswith("split_rows_linear") for m in linears)
    with torch.inference_mode(), prepack.prepacked(model, rows=2):  # copies: none fit
        assert not any("forward" in m.__dict__ for m in model.modules())
