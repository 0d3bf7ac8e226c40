"""BERT: bidirectional encoder with word + position + token-type embeddings, post-LayerNorm
blocks, exact (erf) GELU, an MLM head tied to the word embeddings and an NSP head on [CLS].
The HF mapping at the bottom converts to/from BertForPreTraining."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmtrain.config.schema import ModelConfig
from llmtrain.models.hf_adapter import refuse_narrow_heads
from llmtrain.models.layers import (
    MLP,
    Attention,
    count_params,
    init_weights,
    layer_norm,
    make_attn_mask,
    remap_state_dict,
)
from llmtrain.registry import register


class Block(nn.Module):
    """Post-norm, as in the original Transformer/BERT: norm(x + sublayer(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.attn = Attention(d, cfg.n_head, None, cfg.bias, cfg.dropout, cfg.head_dim)
        self.attn_norm = layer_norm(d, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(d, cfg.d_ff or 4 * d, cfg.bias, cfg.dropout, approximate="none")
        self.mlp_norm = layer_norm(d, cfg.norm_eps, cfg.bias)

    def forward(self, x, attn_mask=None):
        x = self.attn_norm(x + self.attn(x, attn_mask))
        return self.mlp_norm(x + self.mlp(x))


@register("model", "bert")
class Bert(nn.Module):
    is_decoder = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be resolved before building the model"
        self.config = cfg
        d = cfg.d_model
        self.word_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = layer_norm(d, cfg.norm_eps, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # heads always carry biases (as in BERT); they are tiny
        self.pooler = nn.Linear(d, d)  # dense + tanh on [CLS]
        self.nsp = nn.Linear(d, 2)
        self.mlm_dense = nn.Linear(d, d)  # MLM transform: dense + gelu + LayerNorm
        self.mlm_norm = layer_norm(d, cfg.norm_eps)
        self.mlm_decoder = nn.Linear(d, cfg.vocab_size)  # its bias is BERT's output bias
        init_weights(self, cfg.init_std, cfg.n_layer, scale_residual=False)
        if cfg.tie_embeddings:
            self.mlm_decoder.weight = self.word_emb.weight

    # -- interface ------------------------------------------------------------------------

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, kv_cache=None):
        if kv_cache is not None:
            raise ValueError("bert is an encoder; it has no KV cache")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_emb(input_ids) + self.pos_emb(position_ids) + self.type_emb(token_type_ids)
        x = self.drop(self.emb_norm(x))
        mask = make_attn_mask(attention_mask, T, 0, causal=False, device=input_ids.device)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits [..., V] for hidden states [..., D] (the objectives pass the masked positions only)."""
        features, head = self.lm_head_parts(hidden)
        return head(features)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.mlm_decoder

    def lm_head_parts(self, hidden: torch.Tensor):
        """(the MLM transform's output, the vocabulary projection); see gpt2.GPT2.lm_head_parts."""
        return self.mlm_norm(F.gelu(self.mlm_dense(hidden))), self.mlm_decoder

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.nsp(self.pooled(hidden))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, kv_cache=None):
        return self.lm_logits(self.encode(input_ids, attention_mask, token_type_ids, position_ids, kv_cache))

    def num_params(self, non_embedding: bool = False) -> int:
        """non_embedding=True leaves out the lookup tables: position and token-type embeddings,
        and the word embeddings unless they are tied to the MLM decoder (then they do compute)."""
        if not non_embedding:
            return count_params(self)
        exclude = [self.pos_emb, self.type_emb]
        if self.mlm_decoder.weight is not self.word_emb.weight:
            exclude.append(self.word_emb)
        return count_params(self, tuple(exclude))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward+backward), PaLM appendix B / nanoGPT estimate_mfu."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.d_model * seq_len


# ----------------------------------------------------------------------------- Hugging Face

_L = "bert.encoder.layer.{i}."
# (ours, HF BertForPreTraining, transpose). q|k|v are fused in ours and split in HF; they are
# handled in the functions below. HF stores the MLM output bias twice (cls.predictions.bias is
# tied to cls.predictions.decoder.bias); both are written on export.
HF_RULES = [
    ("word_emb.weight", "bert.embeddings.word_embeddings.weight", False),
    ("pos_emb.weight", "bert.embeddings.position_embeddings.weight", False),
    ("type_emb.weight", "bert.embeddings.token_type_embeddings.weight", False),
    ("emb_norm.weight", "bert.embeddings.LayerNorm.weight", False),
    ("emb_norm.bias", "bert.embeddings.LayerNorm.bias", False),
    ("blocks.{i}.attn.proj.weight", _L + "attention.output.dense.weight", False),
    ("blocks.{i}.attn.proj.bias", _L + "attention.output.dense.bias", False),
    ("blocks.{i}.attn_norm.weight", _L + "attention.output.LayerNorm.weight", False),
    ("blocks.{i}.attn_norm.bias", _L + "attention.output.LayerNorm.bias", False),
    ("blocks.{i}.mlp.fc.weight", _L + "intermediate.dense.weight", False),
    ("blocks.{i}.mlp.fc.bias", _L + "intermediate.dense.bias", False),
    ("blocks.{i}.mlp.proj.weight", _L + "output.dense.weight", False),
    ("blocks.{i}.mlp.proj.bias", _L + "output.dense.bias", False),
    ("blocks.{i}.mlp_norm.weight", _L + "output.LayerNorm.weight", False),
    ("blocks.{i}.mlp_norm.bias", _L + "output.LayerNorm.bias", False),
    ("pooler.weight", "bert.pooler.dense.weight", False),
    ("pooler.bias", "bert.pooler.dense.bias", False),
    ("nsp.weight", "cls.seq_relationship.weight", False),
    ("nsp.bias", "cls.seq_relationship.bias", False),
    ("mlm_dense.weight", "cls.predictions.transform.dense.weight", False),
    ("mlm_dense.bias", "cls.predictions.transform.dense.bias", False),
    ("mlm_norm.weight", "cls.predictions.transform.LayerNorm.weight", False),
    ("mlm_norm.bias", "cls.predictions.transform.LayerNorm.bias", False),
    ("mlm_decoder.weight", "cls.predictions.decoder.weight", False),
    ("mlm_decoder.bias", "cls.predictions.decoder.bias", False),
]
_QKV = "blocks.{}.attn.qkv.{}"
_HF_QKV = "bert.encoder.layer.{}.attention.self.{}.{}"
_HF_IGNORE = (r"\.position_ids$", r"\.token_type_ids$")  # index buffers of some HF versions


def hf_config(cfg: ModelConfig):
    from transformers import BertConfig

    refuse_narrow_heads(cfg, "BertConfig")

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.d_ff or 4 * cfg.d_model,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def config_from_hf(hf) -> ModelConfig:
    if hf.hidden_act != "gelu":
        raise ValueError(f"unsupported BERT activation {hf.hidden_act!r} (only 'gelu')")
    return ModelConfig(
        name="bert",
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        d_model=hf.hidden_size,
        d_ff=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        max_seq_len=hf.max_position_embeddings,
        dropout=hf.hidden_dropout_prob,
        bias=True,
        tie_embeddings=getattr(hf, "tie_word_embeddings", True),
        norm_eps=hf.layer_norm_eps,
        type_vocab_size=hf.type_vocab_size,
        init_std=hf.initializer_range,
    )


def _layers(sd: dict, prefix: str) -> list[int]:
    return sorted({int(k.split(".")[prefix.count(".")]) for k in sd if k.startswith(prefix)})


def to_hf_state_dict(sd: dict) -> dict:
    sd = dict(sd)
    out = {}
    for i in _layers(sd, "blocks."):
        d = sd[f"blocks.{i}.attn.proj.weight"].shape[0]
        for kind in ("weight", "bias"):
            if _QKV.format(i, kind) in sd:
                for name, t in zip(("query", "key", "value"), sd.pop(_QKV.format(i, kind)).split(d, dim=0)):
                    out[_HF_QKV.format(i, name, kind)] = t
    out.update(remap_state_dict(sd, HF_RULES))
    # HF BERT always has biases: a bias=False model exports zeros, which is the same function
    for key, w in list(out.items()):
        bias = key[: -len("weight")] + "bias"
        if key.endswith(".weight") and "_embeddings." not in key and bias not in out:
            out[bias] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    return out


def from_hf_state_dict(sd: dict) -> dict:
    sd = dict(sd)
    out = {}
    bias = sd.pop("cls.predictions.bias", None)
    if bias is not None:
        sd.setdefault("cls.predictions.decoder.bias", bias)
    for i in _layers(sd, "bert.encoder.layer."):
        for kind in ("weight", "bias"):
            parts = [sd.pop(_HF_QKV.format(i, n, kind)) for n in ("query", "key", "value")]
            out[_QKV.format(i, kind)] = torch.cat(parts, dim=0)
    out.update(remap_state_dict(sd, HF_RULES, reverse=True, ignore=_HF_IGNORE))
    if "mlm_decoder.weight" not in out:  # tied checkpoints often store the embedding only
        out["mlm_decoder.weight"] = out["word_emb.weight"]
    return out
