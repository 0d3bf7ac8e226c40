"""Our models vs the Hugging Face reference classes, random init (no download): the state-dict
mapping must load strictly and the logits must agree to 1e-5 in float32."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmtrain.config.schema import ModelConfig  # noqa: E402
from llmtrain.models import bert, gpt2, llama  # noqa: E402

V = 83
TOL = dict(atol=1e-5, rtol=1e-5)

CASES = {
    "gpt2": (gpt2, gpt2.GPT2, "GPT2LMHeadModel", dict()),
    "gpt2_untied": (gpt2, gpt2.GPT2, "GPT2LMHeadModel", dict(tie_embeddings=False)),
    "llama": (llama, llama.Llama, "LlamaForCausalLM", dict(bias=False, n_kv_heads=2, rope_theta=500.0)),
    "llama_untied": (llama, llama.Llama, "LlamaForCausalLM", dict(bias=False, tie_embeddings=False)),
    "bert": (bert, bert.Bert, "BertForPreTraining", dict(norm_eps=1e-12)),
}


def build(case: str):
    mod, cls, hf_name, kw = CASES[case]
    cfg = ModelConfig(name=cls.__name__.lower(), n_layer=2, n_head=4, d_model=32, vocab_size=V, max_seq_len=40, **kw)
    torch.manual_seed(0)
    ours = cls(cfg).eval()
    with torch.no_grad():  # perturb everything (zero biases / unit norms would hide mapping bugs)
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = getattr(transformers, hf_name)(mod.hf_config(cfg)).eval()
    return mod, cfg, ours, hf


def load_into_hf(mod, ours, hf):
    result = hf.load_state_dict(mod.to_hf_state_dict(ours.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip(case):
    mod, cfg, ours, hf = build(case)
    sd = ours.state_dict()
    back = mod.from_hf_state_dict(mod.to_hf_state_dict(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # and HF -> ours loads strictly into a fresh model
    load_into_hf(mod, ours, hf)
    fresh = type(ours)(cfg)
    fresh.load_state_dict(mod.from_hf_state_dict(hf.state_dict()), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trip(case):
    mod, cfg, ours, hf = build(case)
    back = mod.config_from_hf(mod.hf_config(cfg))
    fields = [
        "name",
        "n_layer",
        "n_head",
        "d_model",
        "vocab_size",
        "max_seq_len",
        "tie_embeddings",
        "norm_eps",
        "rope_theta" if cfg.name == "llama" else "init_std",
    ]
    for f in fields:
        assert getattr(back, f) == getattr(cfg, f), f
    assert type(ours)(back).num_params() == ours.num_params()


@pytest.mark.parametrize("case", ["gpt2", "gpt2_untied", "llama", "llama_untied"])
def test_decoder_logits_match(case):
    mod, cfg, ours, hf = build(case)
    load_into_hf(mod, ours, hf)
    x = torch.randint(0, V, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(input_ids=x).logits, **TOL)
        # left-padded batch with explicit positions, as in batched generation
        mask = torch.ones_like(x)
        mask[1, :6] = 0
        mask[2, :11] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        a = ours(x, attention_mask=mask, position_ids=pos)
        b = hf(input_ids=x, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        torch.testing.assert_close(a[real], b[real], **TOL)


def test_bert_logits_match():
    mod, cfg, ours, hf = build("bert")
    load_into_hf(mod, ours, hf)
    x = torch.randint(0, V, (3, 19))
    tt = torch.zeros_like(x)
    tt[:, 9:] = 1
    mask = torch.ones_like(x)
    mask[1, 14:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        for am in (None, mask):
            h = ours.encode(x, attention_mask=am, token_type_ids=tt)
            out = hf(input_ids=x, attention_mask=am, token_type_ids=tt)
            torch.testing.assert_close(ours.lm_logits(h), out.prediction_logits, **TOL)
            torch.testing.assert_close(ours.nsp_logits(h), out.seq_relationship_logits, **TOL)
        torch.testing.assert_close(ours(x), hf(input_ids=x).prediction_logits, **TOL)


def test_bias_free_gpt2_exports_zero_biases():
    mod, cfg, ours, hf = build("gpt2")
    cfg_nb = ModelConfig(**{**cfg.__dict__, "bias": False})
    torch.manual_seed(0)
    nb = gpt2.GPT2(cfg_nb).eval()
    load_into_hf(mod, nb, hf)
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(nb(x), hf(input_ids=x).logits, **TOL)
