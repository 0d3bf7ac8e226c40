"""Llama: rotary positions, RMSNorm pre-norm blocks, SwiGLU MLP, grouped-query attention, no
biases. The HF mapping at the bottom converts to/from LlamaForCausalLM (same rotate_half RoPE
layout, so no q/k permutation is needed)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from llmtrain.config.schema import ModelConfig
from llmtrain.models.layers import (
    Attention,
    KVCache,
    RMSNorm,
    Rotary,
    SwiGLU,
    count_params,
    document_inputs,
    dropout,
    init_weights,
    make_attn_mask,
    remap_state_dict,
)
from llmtrain.registry import register


def default_d_ff(d_model: int, multiple_of: int = 64) -> int:
    """Llama's hidden size: 2/3 of 4*d (keeps SwiGLU's 3 matrices at the cost of a 4*d MLP),
    rounded up to a multiple of 64 for efficient matmuls."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(d, cfg.n_head, cfg.n_kv_heads, bias=False, dropout=cfg.dropout, head_dim=cfg.head_dim)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.d_ff or default_d_ff(d), bias=False, dropout=cfg.dropout)

    def forward(self, x, attn_mask=None, rope=None, kv_cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), attn_mask, causal=True, rope=rope, kv_cache=kv_cache, layer=layer)
        return x + self.mlp(self.mlp_norm(x))


@register("model", "llama")
class Llama(nn.Module):
    is_decoder = True
    supports_document_mask = True  # encode() takes document_ids (data.document_mask)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be resolved before building the model"
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.head_dim or cfg.d_model // cfg.n_head, cfg.rope_theta)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, cfg.n_layer)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # -- interface ------------------------------------------------------------------------

    def encode(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        kv_cache: Optional[KVCache] = None,
        document_ids=None,
    ):
        """document_ids [B, T]: packed documents (data.document_mask), attended and positioned apart."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if document_ids is not None:
            mask, position_ids = document_inputs(document_ids, position_ids, attention_mask, kv_cache)
        else:
            mask = make_attn_mask(attention_mask, T, past, causal=True, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        x = dropout(self.drop, self.tok_emb(input_ids))
        rope = self.rotary(position_ids, x.dtype)  # computed once, shared by all layers
        for i, block in enumerate(self.blocks):
            x = block(x, mask, rope, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def lm_head_parts(self, hidden: torch.Tensor):
        """(what the output projection sees, the projection): lm_logits is their composition, and
        the chunked loss (objectives/chunked_ce.py) applies the projection a few rows at a time."""
        return hidden, self.lm_head

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, kv_cache=None, document_ids=None
    ):
        return self.lm_logits(
            self.encode(input_ids, attention_mask, token_type_ids, position_ids, kv_cache, document_ids)
        )

    def new_kv_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        return KVCache.for_blocks(self.blocks, batch_size, max_len, self.tok_emb.weight, device, dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """non_embedding=True leaves out the token-embedding lookup table unless it is tied to
        the output head (then it does compute). RoPE has no parameters."""
        if not non_embedding or self.lm_head.weight is self.tok_emb.weight:
            return count_params(self)
        return count_params(self, (self.tok_emb,))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward+backward), PaLM appendix B / nanoGPT estimate_mfu."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.d_model * seq_len


# ----------------------------------------------------------------------------- Hugging Face

# (ours, HF LlamaForCausalLM, transpose). Ours fuses q|k|v into attn.qkv; HF keeps them apart,
# so those three are split/concatenated in the functions below rather than renamed here.
HF_RULES = [
    ("tok_emb.weight", "model.embed_tokens.weight", False),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", False),
    ("blocks.{i}.attn.proj.weight", "model.layers.{i}.self_attn.o_proj.weight", False),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("blocks.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate_proj.weight", False),
    ("blocks.{i}.mlp.up.weight", "model.layers.{i}.mlp.up_proj.weight", False),
    ("blocks.{i}.mlp.proj.weight", "model.layers.{i}.mlp.down_proj.weight", False),
    ("norm.weight", "model.norm.weight", False),
    ("lm_head.weight", "lm_head.weight", False),
]
_QKV = "blocks.{}.attn.qkv.weight"
_HF_QKV = "model.layers.{}.self_attn.{}_proj.weight"


def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff or default_d_ff(cfg.d_model),
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_head,
        head_dim=cfg.head_dim or cfg.d_model // cfg.n_head,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=cfg.dropout,
        initializer_range=cfg.init_std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def config_from_hf(hf) -> ModelConfig:
    rope = getattr(hf, "rope_parameters", None) or {}  # transformers >= 5 keeps theta here
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    scaling = getattr(hf, "rope_scaling", None) or {}  # transformers < 5
    if rope.get("rope_type", "default") != "default" or scaling.get("rope_type", "default") != "default":
        raise ValueError("only default (unscaled) RoPE is supported")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError("Llama checkpoints with biases are not supported")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim == hf.hidden_size // hf.num_attention_heads:
        head_dim = None
    n_kv = hf.num_key_value_heads
    return ModelConfig(
        name="llama",
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        n_kv_heads=None if n_kv == hf.num_attention_heads else n_kv,
        d_model=hf.hidden_size,
        d_ff=hf.intermediate_size,
        head_dim=head_dim,
        vocab_size=hf.vocab_size,
        max_seq_len=hf.max_position_embeddings,
        dropout=getattr(hf, "attention_dropout", 0.0),
        bias=False,
        tie_embeddings=getattr(hf, "tie_word_embeddings", False),
        norm_eps=hf.rms_norm_eps,
        rope_theta=float(theta),
        init_std=hf.initializer_range,
    )


def _layers(sd: dict, fmt_prefix: str) -> list[int]:
    return sorted({int(k.split(".")[fmt_prefix.count(".")]) for k in sd if k.startswith(fmt_prefix)})


def to_hf_state_dict(sd: dict) -> dict:
    sd = dict(sd)
    out = {}
    for i in _layers(sd, "blocks."):
        qkv = sd.pop(_QKV.format(i))
        # sizes from the layer's own o_proj: q has its input size in rows, k and v share the rest
        d = sd[f"blocks.{i}.attn.proj.weight"].shape[1]
        kv = (qkv.shape[0] - d) // 2
        q, k, v = qkv.split([d, kv, kv], dim=0)
        for name, w in zip("qkv", (q, k, v)):
            out[_HF_QKV.format(i, name)] = w
    out.update(remap_state_dict(sd, HF_RULES))
    return out


def from_hf_state_dict(sd: dict) -> dict:
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old buffers
    out = {}
    for i in _layers(sd, "model.layers."):
        out[_QKV.format(i)] = torch.cat([sd.pop(_HF_QKV.format(i, n)) for n in "qkv"], dim=0)
    out.update(remap_state_dict(sd, HF_RULES, reverse=True))
    if "lm_head.weight" not in out:  # tied checkpoints often store the embedding only
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out
