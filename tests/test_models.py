"""Model architectures: shapes, masking, KV cache, GQA, parameter counts (CPU, tiny sizes)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmtrain.config.schema import ModelConfig
from llmtrain.models.bert import Bert
from llmtrain.models.gpt2 import GPT2
from llmtrain.models.layers import make_attn_mask
from llmtrain.models.llama import Llama, default_d_ff

V = 61


def tiny(name: str, **kw) -> ModelConfig:
    base = dict(name=name, n_layer=2, n_head=4, d_model=32, vocab_size=V, max_seq_len=48)
    if name == "llama":
        base.update(bias=False, n_kv_heads=2)
    base.update(kw)
    return ModelConfig(**base)


def make(name: str, **kw):
    torch.manual_seed(0)
    cls = {"gpt2": GPT2, "llama": Llama, "bert": Bert}[name]
    return cls(tiny(name, **kw)).eval()


DECODERS = ["gpt2", "llama"]
ALL = ["gpt2", "llama", "bert"]


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_interface(name):
    m = make(name)
    x = torch.randint(0, V, (3, 10))
    h = m.encode(x)
    assert h.shape == (3, 10, 32)
    assert m.lm_logits(h).shape == (3, 10, V)
    assert m(x).shape == (3, 10, V)
    assert m.config.name == name
    assert m.is_decoder == (name != "bert")
    if name == "bert":
        assert m.pooled(h).shape == (3, 32)
        assert m.nsp_logits(h).shape == (3, 2)
        tt = torch.zeros_like(x)
        tt[:, 5:] = 1
        assert m(x, token_type_ids=tt).shape == (3, 10, V)


@pytest.mark.parametrize("name", ALL)
def test_backward_with_dropout(name):
    m = make(name, dropout=0.1).train()
    x = torch.randint(0, V, (2, 12))
    h = m.encode(x)
    loss = torch.nn.functional.cross_entropy(m.lm_logits(h).flatten(0, 1), x.flatten())
    if name == "bert":  # the pooler and NSP head only get gradients from the NSP loss
        loss = loss + torch.nn.functional.cross_entropy(m.nsp_logits(h), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", DECODERS)
def test_causal(name):
    m = make(name)
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % V
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_bert_bidirectional_and_padding():
    m = make("bert")
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % V
    assert not torch.allclose(m(x)[:, :9], m(y)[:, :9])  # sees the future
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, 9:] = 0  # now position 9 is padding: changing it must not matter
    torch.testing.assert_close(m(x, mask)[:, :9], m(y, mask)[:, :9])
    # a padded row gives the same outputs on its real tokens as the unpadded sequence
    torch.testing.assert_close(m(x, mask)[:, :9], m(x[:, :9]))


def test_attn_mask_helper():
    assert make_attn_mask(None, 5, 0, causal=True, device="cpu") is None
    assert make_attn_mask(None, 5, 0, causal=False, device="cpu") is None
    m = make_attn_mask(None, 2, 3, causal=True, device="cpu")
    assert m.shape == (1, 1, 2, 5)
    assert m[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]
    pad = torch.tensor([[0, 1, 1]])
    m = make_attn_mask(pad, 3, 0, causal=True, device="cpu")[0, 0]
    # padding query sees itself only (no all-masked row -> no NaN); real tokens skip the pad
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def left_pad(seqs, pad_id=0):
    """Left-padded batch + attention mask + position ids, as the generation engine builds them."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s)
        mask[i, T - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("name", DECODERS)
def test_left_padding_matches_unpadded(name):
    m = make(name)
    torch.manual_seed(1)
    seqs = [torch.randint(1, V, (n,)).tolist() for n in (9, 4, 6)]
    ids, mask, pos = left_pad(seqs)
    logits = m(ids, attention_mask=mask, position_ids=pos)
    assert torch.isfinite(logits).all()
    for i, s in enumerate(seqs):
        ref = m(torch.tensor([s]))[0]
        torch.testing.assert_close(logits[i, -len(s) :], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_kv_cache_greedy_matches_recompute(name):
    m = make(name)
    x = torch.randint(0, V, (2, 7))
    steps = 8
    # full recompute
    seq, ref = x, []
    for _ in range(steps):
        last = m(seq)[:, -1]
        ref.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    # cached: prefill in two chunks, then one token at a time
    cache = m.new_kv_cache(2, x.shape[1] + steps)
    m(x[:, :3], kv_cache=cache)
    last = m(x[:, 3:], kv_cache=cache)[:, -1]
    out = [last]
    for _ in range(steps - 1):
        last = m(last.argmax(-1, keepdim=True), kv_cache=cache)[:, -1]
        out.append(last)
    assert cache.length == x.shape[1] + steps - 1
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([x] + [o.argmax(-1, keepdim=True) for o in out], 1), seq)


@pytest.mark.parametrize("name", DECODERS)
def test_kv_cache_left_padded_batch(name):
    """Generation with left padding: cached decoding with attention_mask + position_ids gives
    each row the logits of decoding that row alone without padding."""
    m = make(name)
    torch.manual_seed(2)
    seqs = [torch.randint(1, V, (n,)).tolist() for n in (8, 3, 5)]
    ids, mask, pos = left_pad(seqs)
    steps = 6
    cache = m.new_kv_cache(len(seqs), ids.shape[1] + steps)
    logits = m(ids, attention_mask=mask, position_ids=pos, kv_cache=cache)[:, -1]
    outs = [logits]
    next_pos = pos[:, -1:] + 1
    for _ in range(steps - 1):
        tok = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        logits = m(tok, attention_mask=mask, position_ids=next_pos, kv_cache=cache)[:, -1]
        outs.append(logits)
        next_pos = next_pos + 1
    gen = torch.stack([o.argmax(-1) for o in outs], 1)  # [B, steps]
    for i, s in enumerate(seqs):
        row = torch.tensor([s])
        for t in range(steps):
            ref = m(row)[0, -1]
            torch.testing.assert_close(outs[t][i], ref, atol=1e-5, rtol=1e-5)
            row = torch.cat([row, ref.argmax().view(1, 1)], 1)
        assert row[0, len(s) :].tolist() == gen[i].tolist()


def test_kv_cache_overflow_and_reset():
    m = make("gpt2")
    cache = m.new_kv_cache(1, 4)
    assert cache.k.shape == (2, 1, 4, 4, 8)
    m(torch.randint(0, V, (1, 4)), kv_cache=cache)
    with pytest.raises(ValueError):
        m(torch.randint(0, V, (1, 1)), kv_cache=cache)
    cache.reset()
    assert cache.length == 0
    m(torch.randint(0, V, (1, 2)), kv_cache=cache)
    assert cache.length == 2


def test_kv_cache_reorder_and_crop():
    m = make("llama")
    x = torch.randint(0, V, (2, 6))
    nxt = torch.randint(0, V, (2, 1))
    cache = m.new_kv_cache(2, 10)
    m(x, kv_cache=cache)
    cache.reorder(torch.tensor([1, 0]))  # beam search: swap rows
    out = m(nxt, kv_cache=cache)[:, -1]
    ref = m(torch.cat([x.flip(0), nxt], 1))[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cache.crop(3)  # drop everything after the first 3 positions and continue from there
    out = m(x[:, 3:4], kv_cache=cache)[:, -1]
    ref = m(torch.cat([x.flip(0)[:, :3], x[:, 3:4]], 1))[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cache.length == 4


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make("llama", n_head=4, n_kv_heads=2)
    mha = make("llama", n_head=4, n_kv_heads=None)
    assert gqa.blocks[0].attn.qkv.weight.shape == (32 + 2 * 16, 32)
    assert mha.blocks[0].attn.qkv.weight.shape == (3 * 32, 32)
    sd = gqa.state_dict()
    hd = 8
    for i in range(2):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].split([32, 16, 16])
        # kv head j serves query heads 2j, 2j+1
        rep = lambda w: w.view(2, hd, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # noqa: E731
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)
    cache = gqa.new_kv_cache(2, 16)
    assert cache.k.shape[2] == 2  # the cache stores only the kv heads


def test_gpt2_124m_param_count_and_flops():
    cfg = ModelConfig(name="gpt2", n_layer=12, n_head=12, d_model=768, vocab_size=50304, max_seq_len=1024)
    d, L, Vv, T = 768, 12, 50304, 1024
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = Vv * d + T * d + L * per_layer + 2 * d
    assert expected == 124_475_904
    m = GPT2(cfg)
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - T * d
    assert m.flops_per_token(T) == 6 * (expected - T * d) + 12 * L * d * T
    # nanoGPT init: residual projections get std / sqrt(2 * n_layer)
    assert abs(m.blocks[0].attn.proj.weight.std().item() - 0.02 / (24**0.5)) < 5e-4
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 5e-4


def test_llama_untied_head_and_param_counts():
    tied = make("llama", tie_embeddings=True)
    untied = make("llama", tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() == tied.num_params() + V * 32
    # an untied input table is a pure lookup: excluded from the FLOP-relevant count
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)
    assert "lm_head.weight" in dict(untied.named_parameters())
    x = torch.randint(0, V, (2, 5))
    assert untied(x).shape == (2, 5, V)
    assert default_d_ff(4096) == 10944 and default_d_ff(32) == 128
    assert untied.blocks[0].mlp.gate.weight.shape == (default_d_ff(32), 32)
    assert not any(n.endswith(".bias") for n, _ in untied.named_parameters())


@pytest.mark.parametrize("name", ALL)
def test_no_decay_names(name):
    """The trainer's rule: ndim < 2 or a name containing 'emb'/'wte'/'wpe' -> no weight decay.
    Embedding tables must be caught by name; tied heads must show up under the embedding name."""
    m = make(name)
    params = dict(m.named_parameters())  # shared tensors listed once, under their first name
    embeds = {id(mod.weight) for mod in m.modules() if isinstance(mod, torch.nn.Embedding)}
    for n, p in params.items():
        if id(p) in embeds:
            assert "emb" in n or "wte" in n or "wpe" in n, n
    assert not any(n.startswith(("lm_head.", "mlm_decoder.weight")) for n in params)


def test_bert_rejects_cache_and_param_count():
    m = make("bert")
    with pytest.raises(ValueError):
        m(torch.randint(0, V, (1, 3)), kv_cache=object())
    assert m.num_params() - m.num_params(non_embedding=True) == 48 * 32 + 2 * 32


@pytest.mark.parametrize("name", ALL)
def test_build_model_via_registry(name):
    if importlib.util.find_spec("llmtrain.objectives") is None:
        pytest.skip("llmtrain.objectives not written yet (registry imports it)")
    from llmtrain.models import build_model

    m = build_model(tiny(name))
    assert type(m) is {"gpt2": GPT2, "llama": Llama, "bert": Bert}[name]
