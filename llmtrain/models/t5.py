"""T5 (v1.1): an encoder-decoder of RMSNorm pre-norm blocks with a learned relative position
bias (bucketed, shared by the layers of each stack), gated-GELU MLPs, no biases, unscaled
attention (the 1/sqrt(d) is folded into the init) and an untied LM head unless
model.tie_embeddings (then the decoder output is scaled by d_model**-0.5, as in T5 v1.0).
The HF mapping at the bottom converts to/from T5ForConditionalGeneration.

The decoder starts from the pad id (T5's decoder_start_token_id); sentinels are the
model.extra_ids ids above the tokenizer's vocabulary (llmtrain/objectives/span_corruption.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from llmtrain.config.schema import ModelConfig
from llmtrain.models.layers import (
    Attention,
    CrossAttention,
    KVCache,
    RelativePositionBias,
    RMSNorm,
    SwiGLU,
    count_params,
    remap_state_dict,
)
from llmtrain.registry import register


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.n_head


def _d_ff(cfg: ModelConfig) -> int:
    return cfg.d_ff or 2 * cfg.d_model  # T5 v1.1 small's ratio (1024 at d_model 512)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, _head_dim(cfg)
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(d, cfg.n_head, None, bias=False, dropout=cfg.dropout, head_dim=hd, scale=1.0)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = SwiGLU(d, _d_ff(cfg), bias=False, dropout=cfg.dropout, act="gelu_tanh")

    def forward(self, x, mask):
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, _head_dim(cfg)
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(d, cfg.n_head, None, bias=False, dropout=cfg.dropout, head_dim=hd, scale=1.0)
        self.cross_norm = RMSNorm(d, cfg.norm_eps)
        self.cross_attn = CrossAttention(d, cfg.n_head, bias=False, dropout=cfg.dropout, head_dim=hd, scale=1.0)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = SwiGLU(d, _d_ff(cfg), bias=False, dropout=cfg.dropout, act="gelu_tanh")

    def forward(self, x, mask, memory, memory_mask, kv_cache=None, layer=0, cross_kv=None):
        x = x + self.attn(self.attn_norm(x), mask, kv_cache=kv_cache, layer=layer)
        x = x + self.cross_attn(self.cross_norm(x), memory, memory_mask, kv=cross_kv)
        return x + self.mlp(self.mlp_norm(x))


@register("model", "t5")
class T5(nn.Module):
    is_decoder = False  # not a causal LM: clm and the decoder-only tasks refuse it
    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be resolved before building the model"
        self.config = cfg
        d, nh = cfg.d_model, cfg.n_head
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)  # shared by encoder, decoder (and a tied head)
        self.drop = nn.Dropout(cfg.dropout)
        self.enc_bias = RelativePositionBias(nh, cfg.relative_buckets, cfg.relative_max_distance, True)
        self.enc_blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.enc_norm = RMSNorm(d, cfg.norm_eps)
        self.dec_bias = RelativePositionBias(nh, cfg.relative_buckets, cfg.relative_max_distance, False)
        self.dec_blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        self.dec_norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """T5's init (HF T5PreTrainedModel, factor 1): the attention scale lives here, since the
        logits are not divided by sqrt(head_dim). The untied head gets d_model**-0.5 instead of
        T5's 1.0, so the first logits are O(1) rather than O(sqrt(d_model))."""
        c = self.config
        d, hd, nh, ff = c.d_model, _head_dim(c), c.n_head, _d_ff(c)
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=d**-0.5)
        for bias in (self.enc_bias, self.dec_bias):
            nn.init.normal_(bias.bias.weight, std=d**-0.5)
        for m in self.modules():
            if isinstance(m, (Attention, CrossAttention)):
                inner = nh * hd
                if isinstance(m, Attention):
                    q, kv = m.qkv.weight[:inner], m.qkv.weight[inner:]
                else:
                    q, kv = m.q.weight, m.kv.weight
                with torch.no_grad():
                    q.normal_(std=(d * hd) ** -0.5)
                    kv.normal_(std=d**-0.5)
                nn.init.normal_(m.proj.weight, std=inner**-0.5)
            elif isinstance(m, SwiGLU):
                nn.init.normal_(m.gate.weight, std=d**-0.5)
                nn.init.normal_(m.up.weight, std=d**-0.5)
                nn.init.normal_(m.proj.weight, std=ff**-0.5)

    @property
    def blocks(self) -> nn.ModuleList:
        """Every block, encoder first: what FSDP shards and activation checkpointing wraps."""
        return nn.ModuleList([*self.enc_blocks, *self.dec_blocks])

    # -- interface ------------------------------------------------------------------------

    def _neg(self, dtype) -> float:
        return torch.finfo(dtype if dtype.is_floating_point else torch.float32).min

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, kv_cache=None):
        """Encoder output [B, S, D]; attention_mask [B, S] (1 = token, 0 = padding)."""
        if kv_cache is not None:
            raise ValueError("the t5 encoder has no KV cache (the decoder has: decode(kv_cache=...))")
        T = input_ids.shape[1]
        x = self.drop(self.tok_emb(input_ids))
        mask = self.enc_bias(T, T)  # [1, nh, T, T], added to the attention logits
        if attention_mask is not None:
            pad = ~attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            mask = mask.masked_fill(pad, self._neg(mask.dtype))
        for block in self.enc_blocks:
            x = block(x, mask)
        return self.drop(self.enc_norm(x))

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys/values of the encoder output: computed once
        per generation, then reused by every decoding step."""
        return [block.cross_attn.kv_of(memory) for block in self.dec_blocks]

    def decode(self, decoder_input_ids, memory=None, memory_mask=None, kv_cache: KVCache | None = None, cross_kv=None):
        """Decoder output [B, T, D] (before the LM head). memory: the encoder output, or cross_kv
        (from cross_kv(memory)); kv_cache: the decoder's self-attention cache."""
        B, T = decoder_input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        x = self.drop(self.tok_emb(decoder_input_ids))
        mask = self.dec_bias(T, past + T, past)
        q_pos = torch.arange(past, past + T, device=x.device)[:, None]
        future = torch.arange(past + T, device=x.device)[None, :] > q_pos
        mask = mask.masked_fill(future, self._neg(mask.dtype))
        mem_mask = None
        if memory_mask is not None:
            mem_mask = memory_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        for i, block in enumerate(self.dec_blocks):
            x = block(x, mask, memory, mem_mask, kv_cache, i, cross_kv[i] if cross_kv is not None else None)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.drop(self.dec_norm(x))

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head.weight is self.tok_emb.weight:
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, **_):
        memory = self.encode(input_ids, attention_mask)
        return self.lm_logits(self.decode(decoder_input_ids, memory, attention_mask))

    def new_kv_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        return KVCache.for_blocks(self.dec_blocks, batch_size, max_len, self.tok_emb.weight, device, dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        if not non_embedding or self.lm_head.weight is self.tok_emb.weight:
            return count_params(self)
        return count_params(self, (self.tok_emb,))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N plus attention, with both stacks' attention counted."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * 2 * c.n_layer * c.d_model * seq_len


# ----------------------------------------------------------------------------- Hugging Face

_E, _D = "encoder.block.{i}.layer.", "decoder.block.{i}.layer."
# (ours, HF T5ForConditionalGeneration, transpose). Fused q|k|v (self) and k|v (cross) are split
# and joined in the functions below.
HF_RULES = [
    ("tok_emb.weight", "shared.weight", False),
    ("enc_bias.bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
    ("dec_bias.bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
    ("enc_blocks.{i}.attn_norm.weight", _E + "0.layer_norm.weight", False),
    ("enc_blocks.{i}.attn.proj.weight", _E + "0.SelfAttention.o.weight", False),
    ("enc_blocks.{i}.mlp_norm.weight", _E + "1.layer_norm.weight", False),
    ("enc_blocks.{i}.mlp.gate.weight", _E + "1.DenseReluDense.wi_0.weight", False),
    ("enc_blocks.{i}.mlp.up.weight", _E + "1.DenseReluDense.wi_1.weight", False),
    ("enc_blocks.{i}.mlp.proj.weight", _E + "1.DenseReluDense.wo.weight", False),
    ("enc_norm.weight", "encoder.final_layer_norm.weight", False),
    ("dec_blocks.{i}.attn_norm.weight", _D + "0.layer_norm.weight", False),
    ("dec_blocks.{i}.attn.proj.weight", _D + "0.SelfAttention.o.weight", False),
    ("dec_blocks.{i}.cross_norm.weight", _D + "1.layer_norm.weight", False),
    ("dec_blocks.{i}.cross_attn.q.weight", _D + "1.EncDecAttention.q.weight", False),
    ("dec_blocks.{i}.cross_attn.proj.weight", _D + "1.EncDecAttention.o.weight", False),
    ("dec_blocks.{i}.mlp_norm.weight", _D + "2.layer_norm.weight", False),
    ("dec_blocks.{i}.mlp.gate.weight", _D + "2.DenseReluDense.wi_0.weight", False),
    ("dec_blocks.{i}.mlp.up.weight", _D + "2.DenseReluDense.wi_1.weight", False),
    ("dec_blocks.{i}.mlp.proj.weight", _D + "2.DenseReluDense.wo.weight", False),
    ("dec_norm.weight", "decoder.final_layer_norm.weight", False),
    ("lm_head.weight", "lm_head.weight", False),
]
# HF stores the shared embedding under three names (tied); ours is tok_emb alone
_HF_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_config(cfg: ModelConfig):
    from transformers import T5Config

    return T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=_head_dim(cfg),
        d_ff=_d_ff(cfg),
        num_layers=cfg.n_layer,
        num_decoder_layers=cfg.n_layer,
        num_heads=cfg.n_head,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=cfg.tie_embeddings,  # False: T5 v1.1 (no output scaling)
        decoder_start_token_id=0,  # set to our pad id by the export
    )


def prepare_hf_model(hf, cfg: ModelConfig) -> None:
    """transformers 5 builds every T5 with lm_head tied to the embedding; an untied (v1.1) model
    needs its own head tensor before the weights are loaded, and saved under its own name."""
    if not cfg.tie_embeddings:
        hf.lm_head.weight = nn.Parameter(hf.shared.weight.detach().clone())
        getattr(hf, "all_tied_weights_keys", {}).pop("lm_head.weight", None)


def config_from_hf(hf) -> ModelConfig:
    if getattr(hf, "feed_forward_proj", "relu") != "gated-gelu":
        raise ValueError(f"only T5 v1.1 (feed_forward_proj 'gated-gelu'), not {hf.feed_forward_proj!r}")
    if hf.num_decoder_layers != hf.num_layers:
        raise ValueError("encoder and decoder must have the same number of layers")
    tied = getattr(hf, "scale_decoder_outputs", getattr(hf, "tie_word_embeddings", True))
    return ModelConfig(
        name="t5",
        n_layer=hf.num_layers,
        n_head=hf.num_heads,
        d_model=hf.d_model,
        d_ff=hf.d_ff,
        head_dim=None if hf.d_kv * hf.num_heads == hf.d_model else hf.d_kv,
        vocab_size=hf.vocab_size,
        max_seq_len=512,
        dropout=hf.dropout_rate,
        bias=False,
        tie_embeddings=bool(tied),
        norm_eps=hf.layer_norm_epsilon,
        relative_buckets=hf.relative_attention_num_buckets,
        relative_max_distance=hf.relative_attention_max_distance,
    )


def _layers(sd: dict, prefix: str) -> list[int]:
    return sorted({int(k.split(".")[prefix.count(".")]) for k in sd if k.startswith(prefix)})


def to_hf_state_dict(sd: dict) -> dict:
    sd = dict(sd)
    out = {}
    for stack, hf in (("enc", "encoder"), ("dec", "decoder")):
        for i in _layers(sd, f"{stack}_blocks."):
            qkv = sd.pop(f"{stack}_blocks.{i}.attn.qkv.weight")
            for name, w in zip("qkv", qkv.chunk(3, dim=0)):
                out[f"{hf}.block.{i}.layer.0.SelfAttention.{name}.weight"] = w
            if stack == "dec":
                k, v = sd.pop(f"dec_blocks.{i}.cross_attn.kv.weight").chunk(2, dim=0)
                out[f"decoder.block.{i}.layer.1.EncDecAttention.k.weight"] = k
                out[f"decoder.block.{i}.layer.1.EncDecAttention.v.weight"] = v
    out.update(remap_state_dict(sd, HF_RULES))
    for key in _HF_TIED:
        out[key] = out["shared.weight"]
    return out


def from_hf_state_dict(sd: dict) -> dict:
    sd = {k: v for k, v in sd.items() if k not in _HF_TIED}
    out = {}
    for stack, hf in (("enc", "encoder"), ("dec", "decoder")):
        for i in _layers(sd, f"{hf}.block."):
            parts = [sd.pop(f"{hf}.block.{i}.layer.0.SelfAttention.{n}.weight") for n in "qkv"]
            out[f"{stack}_blocks.{i}.attn.qkv.weight"] = torch.cat(parts, dim=0)
            if stack == "dec":
                kv = [sd.pop(f"decoder.block.{i}.layer.1.EncDecAttention.{n}.weight") for n in "kv"]
                out[f"dec_blocks.{i}.cross_attn.kv.weight"] = torch.cat(kv, dim=0)
    out.update(remap_state_dict(sd, HF_RULES, reverse=True))
    if "lm_head.weight" not in out:  # tied checkpoints may store the embedding only
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out
