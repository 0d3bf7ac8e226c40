"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP, tied embeddings.
Follows nanoGPT's model.py; the HF mapping at the bottom converts to/from GPT2LMHeadModel."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from llmtrain.config.schema import ModelConfig
from llmtrain.models.hf_adapter import refuse_narrow_heads
from llmtrain.models.layers import (
    MLP,
    Attention,
    KVCache,
    count_params,
    document_inputs,
    dropout,
    init_weights,
    layer_norm,
    make_attn_mask,
    remap_state_dict,
)
from llmtrain.registry import register


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.ln_1 = layer_norm(d, cfg.norm_eps, cfg.bias)
        self.attn = Attention(d, cfg.n_head, None, cfg.bias, cfg.dropout, cfg.head_dim)
        self.ln_2 = layer_norm(d, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(d, cfg.d_ff or 4 * d, cfg.bias, cfg.dropout, approximate="tanh")

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, causal=True, kv_cache=kv_cache, layer=layer)
        return x + self.mlp(self.ln_2(x))


@register("model", "gpt2")
class GPT2(nn.Module):
    is_decoder = True
    supports_document_mask = True  # encode() takes document_ids (data.document_mask)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be resolved before building the model"
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)  # token embeddings
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)  # learned positions
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = layer_norm(cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, cfg.n_layer)
        if cfg.tie_embeddings:
            # registered after wte, so named_parameters() reports the shared tensor as wte.weight
            self.lm_head.weight = self.wte.weight

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
        x = dropout(self.drop, self.wte(input_ids) + self.wpe(position_ids))
        for i, block in enumerate(self.blocks):
            x = block(x, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def get_output_embeddings(self) -> nn.Module:
        """The vocabulary projection (Hugging Face's names for the pair)."""
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
        return KVCache.for_blocks(self.blocks, batch_size, max_len, self.wte.weight, device, dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """non_embedding=True leaves out pure lookup tables: the position embeddings, and the
        token embeddings unless they are tied to the output head (then they do compute)."""
        if not non_embedding:
            return count_params(self)
        exclude = [self.wpe] + ([] if self.lm_head.weight is self.wte.weight else [self.wte])
        return count_params(self, tuple(exclude))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward+backward), PaLM appendix B / nanoGPT estimate_mfu."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.d_model * seq_len


# ----------------------------------------------------------------------------- Hugging Face

# (ours, HF GPT2LMHeadModel, transpose). HF GPT-2 uses Conv1D ([in, out] weights), so every
# linear layer inside the blocks is transposed; q/k/v are fused in the same order as ours.
HF_RULES = [
    ("wte.weight", "transformer.wte.weight", False),
    ("wpe.weight", "transformer.wpe.weight", False),
    ("blocks.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", False),
    ("blocks.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", False),
    ("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    ("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    ("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("blocks.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", False),
    ("blocks.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", False),
    ("blocks.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("blocks.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("blocks.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("blocks.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("ln_f.weight", "transformer.ln_f.weight", False),
    ("ln_f.bias", "transformer.ln_f.bias", False),
    ("lm_head.weight", "lm_head.weight", False),
]
# causal-mask buffers that older transformers versions stored in GPT-2 checkpoints
HF_IGNORE = (r"\.attn\.bias$", r"\.attn\.masked_bias$")


def hf_config(cfg: ModelConfig):
    from transformers import GPT2Config

    refuse_narrow_heads(cfg, "GPT2Config")

    special = {} if cfg.vocab_size > 50256 else {"bos_token_id": None, "eos_token_id": None}
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_ff,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        **special,
    )


def config_from_hf(hf) -> ModelConfig:
    return ModelConfig(
        name="gpt2",
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        d_model=hf.n_embd,
        d_ff=hf.n_inner,
        vocab_size=hf.vocab_size,
        max_seq_len=hf.n_positions,
        dropout=hf.resid_pdrop,
        bias=True,
        tie_embeddings=getattr(hf, "tie_word_embeddings", True),
        norm_eps=hf.layer_norm_epsilon,
        init_std=hf.initializer_range,
    )


def to_hf_state_dict(sd: dict) -> dict:
    out = remap_state_dict(sd, HF_RULES)
    # HF GPT-2 always has biases: a bias=False model exports zeros, which is the same function
    for key, w in list(out.items()):
        if key.startswith("transformer.h.") or key.startswith("transformer.ln_f."):
            bias = key[: -len("weight")] + "bias"
            if key.endswith(".weight") and bias not in out:
                out[bias] = torch.zeros(w.shape[-1], dtype=w.dtype, device=w.device)
    return out


def from_hf_state_dict(sd: dict) -> dict:
    # accept bare GPT2Model checkpoints (no "transformer." prefix) too
    sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in sd.items()}
    out = remap_state_dict(sd, HF_RULES, reverse=True, ignore=HF_IGNORE)
    if "lm_head.weight" not in out:  # tied checkpoints often store the embedding only
        out["lm_head.weight"] = out["wte.weight"]
    return out
