"""Building blocks shared by the architectures: attention, MLPs, norms, rotary embeddings,
the attention-mask helpers (padding, packed documents) and the KV cache. Each model file only
wires these together."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- norms


def layer_norm(d: int, eps: float, bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(d, eps=eps, bias=bias)


class RMSNorm(nn.Module):
    """Llama's RMSNorm. Normalises in float32 (as HF does) so bf16 training matches."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's rms_norm: the same value bit for bit in one call instead of six Python-level
            # ops (on the CPU it is still several kernels; a decoding step of a 124M Llama spends
            # about 5% of its time in its norms)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------- dropout


def dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """module(x), skipping the module call where it is the identity (eval or p == 0): a decoding
    step of a small model is mostly per-call overhead, and there are two of these per layer."""
    return module(x) if module.training and module.p > 0 else x


# ----------------------------------------------------------------------------- MLPs


class MLP(nn.Module):
    """Linear -> GELU -> Linear. approximate='tanh' is GPT-2's gelu_new, 'none' is BERT's erf."""

    def __init__(self, d: int, d_ff: int, bias: bool, dropout: float, approximate: str = "none"):
        super().__init__()
        self.fc = nn.Linear(d, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d, bias=bias)  # residual projection (scaled init)
        self.approximate = approximate
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.dropout, self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)): Llama's SwiGLU (act silu) or T5 v1.1's gated GELU
    (act "gelu_tanh", HF's gelu_new)."""

    def __init__(self, d: int, d_ff: int, bias: bool = False, dropout: float = 0.0, act: str = "silu"):
        super().__init__()
        self.gate = nn.Linear(d, d_ff, bias=bias)
        self.up = nn.Linear(d, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d, bias=bias)  # residual projection (scaled init)
        self.act = act
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        inplace = not torch.is_grad_enabled()  # nothing is kept for backward: two fewer allocations
        g = F.silu(g, inplace=inplace) if self.act == "silu" else F.gelu(g, approximate="tanh")
        h = g.mul_(self.up(x)) if inplace else g * self.up(x)
        return dropout(self.dropout, self.proj(h))


# ----------------------------------------------------------------------------- rotary


class Rotary(nn.Module):
    """Rotary position embedding in HF's rotate_half layout (first half / second half of each
    head are the pair), so HF Llama checkpoints load without permuting q/k."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        # not persistent: derived from the config, so it never enters checkpoints
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B,T] -> (cos, sin), each [B,1,T,head_dim], broadcast over heads. The first
        half of sin is negated (rotate_half's sign), for apply_rotary."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # fp32 for long positions
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        sin = emb.sin()
        half = sin.shape[-1] // 2
        return emb.cos().to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, bit for bit: with rotate_half's sign already in `sin`
    (Rotary), rotate_half(x) * sin is a roll of x times sin (per layer: one op instead of neg and
    cat; the sign flip is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys/values for every layer: k, v are [n_layer, B, n_kv_heads, max_len, hd].
    `length` is how many positions are filled. A forward pass with the cache writes its new
    keys/values at [length, length+T) in every layer and then advances `length` by T."""

    def __init__(self, n_layer, batch_size, n_kv_heads, max_len, head_dim, device=None, dtype=None):
        shape = (n_layer, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._split_layers()
        self.length = 0
        self.max_len = max_len

    def _split_layers(self) -> None:
        # each layer's [B, n_kv_heads, max_len, hd] views, made once instead of indexed every step
        self._layers = [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    @classmethod
    def for_blocks(cls, blocks, batch_size: int, max_len: int, like: torch.Tensor, device=None, dtype=None):
        """A cache for a stack of blocks whose `.attn` is an Attention, on `like`'s device/dtype by default."""
        a = blocks[0].attn
        return cls(
            len(blocks), batch_size, a.n_kv_heads, max_len, a.head_dim, device or like.device, dtype or like.dtype
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v for `layer`; return all keys/values so far (cache + new)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > max_len {self.max_len}")
        # narrow + copy_: in-place writes to the preallocated buffers, fewer ops than slice assignment
        k_all, v_all = self._layers[layer]
        k_all.narrow(2, start, end - start).copy_(k)
        v_all.narrow(2, start, end - start).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def crop(self, length: int) -> None:
        """Forget everything after `length` positions (e.g. to re-run a prompt suffix)."""
        self.length = min(self.length, length)

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search): row i becomes old row index[i]."""
        self.k = self.k.index_select(1, index.to(self.k.device))
        self.v = self.v.index_select(1, index.to(self.v.device))
        self._split_layers()

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


# ----------------------------------------------------------------------------- attention


def make_attn_mask(
    attention_mask: Optional[torch.Tensor], T: int, past: int, causal: bool, device
) -> Optional[torch.Tensor]:
    """Boolean SDPA mask [B or 1, 1, T, past+T] (True = may attend), or None when plain
    causal/unmasked attention suffices (lets SDPA pick its fastest kernel).

    attention_mask is [B, past+T] with 1 = real token, 0 = padding."""
    S = past + T
    # T == 1 (a decoding step): the one query comes last, so causal order hides nothing
    if attention_mask is None and (not causal or past == 0 or T == 1):
        return None
    keys = None
    if attention_mask is not None:
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {S}")
        keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [B,1,1,S]
    if not causal:
        return keys  # broadcast over queries
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # [1,1,T,S]
    if keys is not None:
        # A padding query (left padding) would see no key at all and SDPA would return NaN;
        # let every query see itself. Rows of real tokens are unchanged by this.
        allowed = (allowed & keys) | (k_pos == q_pos)[None, None]
    return allowed


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document: [B, T] document ids -> [B, T] positions that
    restart at 0 wherever the id changes (packed documents, data.document_mask)."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal SDPA mask [B, 1, T, T] (True = may attend) of packed documents: a
    token sees the earlier tokens of its own document only. A boolean mask, not FlexAttention:
    torch 2.13 has no FlexAttention backward on CPU, and SDPA takes this mask on every device."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]


def document_inputs(document_ids: torch.Tensor, position_ids, attention_mask, kv_cache):
    """(attention mask, position ids) of a packed window whose tokens carry document ids. Training
    only: padding is a document of its own, and a KV cache would need the ids of its prefix."""
    if attention_mask is not None or kv_cache is not None:
        raise ValueError("document_ids exclude attention_mask and kv_cache (give padding a document id)")
    return document_mask(document_ids), document_positions(document_ids) if position_ids is None else position_ids


class Attention(nn.Module):
    """Multi-head attention with one fused qkv projection, grouped-query heads (n_kv_heads
    <= n_head) and torch's scaled_dot_product_attention."""

    def __init__(
        self,
        d: int,
        n_head: int,
        n_kv_heads: Optional[int] = None,
        bias: bool = True,
        dropout: float = 0.0,
        head_dim: Optional[int] = None,
        scale: Optional[float] = None,
    ):
        """head_dim: None = d // n_head (T5's d_kv may differ; structured pruning leaves fewer heads);
        scale: None = 1/sqrt(head_dim) (T5 uses 1: the scaling is folded into its init)."""
        super().__init__()
        assert head_dim or d % n_head == 0, "d_model must be divisible by n_head"
        self.n_head = n_head
        self.n_kv_heads = n_kv_heads or n_head
        assert n_head % self.n_kv_heads == 0, "n_head must be a multiple of n_kv_heads"
        self.head_dim = head_dim or d // n_head
        self.scale = scale
        self.qkv = nn.Linear(d, (n_head + 2 * self.n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_head * self.head_dim, d, bias=bias)  # residual projection (scaled init)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None, causal=False, rope=None, kv_cache=None, layer=0):
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_heads
        # heads first, then split: the same [B, heads, T, hd] views as splitting q|k|v and
        # viewing each, in 3 ops instead of 7 (a decoding step of a small model is mostly per-op
        # overhead; split_with_sizes skips Tensor.split's Python wrapper)
        heads = self.qkv(x).view(B, T, nh + 2 * nkv, hd).transpose(1, 2)
        if rope is None:
            q, k, v = heads.split_with_sizes([nh, nkv, nkv], 1)
        else:  # q and k rotated together: half the elementwise ops, the same values
            qk, v = heads.split_with_sizes([nh + nkv, nkv], 1)
            q, k = apply_rotary(qk, *rope).split_with_sizes([nh, nkv], 1)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # an additive bias (t5) under autocast
        # GQA: kv head i serves query heads [i*rep, (i+1)*rep), as in HF repeat_kv. With a cache
        # SDPA's enable_gqa reads the shared heads in place (the same result, without copying the
        # whole cache rep times every step); training keeps the explicit repeat.
        gqa = nkv != nh and kv_cache is not None
        if nkv != nh and not gqa:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            # plain causal only when there is no explicit mask and no cached prefix
            is_causal=causal and attn_mask is None and k.shape[2] == T,
            scale=self.scale,
            enable_gqa=gqa,
        )
        # one query: [B, nh, 1, hd] already has the output's order, so skip the transpose
        y = y.reshape(B, T, nh * hd) if T == 1 else y.transpose(1, 2).reshape(B, T, nh * hd)
        return dropout(self.resid_dropout, self.proj(y))


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention: queries from x, keys/values from the encoder output
    (`memory`). The keys/values depend on the memory only, so generation computes them once
    (`kv`) and passes them to every step instead of the memory."""

    def __init__(self, d: int, n_head: int, bias: bool = True, dropout: float = 0.0, head_dim=None, scale=None):
        super().__init__()
        self.n_head, self.head_dim, self.scale = n_head, head_dim or d // n_head, scale
        inner = n_head * self.head_dim
        self.q = nn.Linear(d, inner, bias=bias)
        self.kv = nn.Linear(d, 2 * inner, bias=bias)
        self.proj = nn.Linear(inner, d, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def kv_of(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each [B, n_head, S, head_dim], of the encoder output [B, S, D]."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, memory=None, attn_mask=None, kv=None):
        B, T, _ = x.shape
        k, v = kv if kv is not None else self.kv_of(memory)
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        return dropout(self.resid_dropout, self.proj(y.transpose(1, 2).reshape(B, T, -1)))


class RelativePositionBias(nn.Module):
    """T5's learned attention bias per head for bucketed relative positions (key - query):
    exact buckets for small distances, log-spaced ones up to max_distance, half of the
    buckets per direction when bidirectional (the encoder), past positions only otherwise."""

    def __init__(self, n_head: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.bias = nn.Embedding(num_buckets, n_head)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        n_buckets, out = self.num_buckets, torch.zeros_like(rel)
        if self.bidirectional:
            n_buckets //= 2
            out = out + (rel > 0).long() * n_buckets
            n = rel.abs()
        else:
            n = (-rel).clamp(min=0)
        exact = n_buckets // 2
        large = exact + (torch.log(n.float() / exact) / math.log(self.max_distance / exact) * (n_buckets - exact)).to(
            torch.long
        )
        large = large.clamp(max=n_buckets - 1)
        return out + torch.where(n < exact, n, large)

    def forward(self, q_len: int, k_len: int, past: int = 0) -> torch.Tensor:
        """Bias [1, n_head, q_len, k_len] for queries at positions past..past+q_len."""
        dev = self.bias.weight.device
        rel = torch.arange(k_len, device=dev)[None, :] - torch.arange(past, past + q_len, device=dev)[:, None]
        return self.bias(self.bucket(rel)).permute(2, 0, 1)[None]


# ----------------------------------------------------------------------------- init / counting


def init_weights(model: nn.Module, std: float, n_layer: int, scale_residual: bool = True) -> None:
    """nanoGPT/GPT-2 init: N(0, std) for Linear and Embedding, zero biases, and residual
    projections (modules named *.proj inside blocks) scaled by 1/sqrt(2*n_layer) so the residual
    stream's variance does not grow with depth."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, (nn.LayerNorm, RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if scale_residual and name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer))


def count_params(model: nn.Module, exclude: tuple = ()) -> int:
    """Unique parameters (tied weights counted once), minus the given modules' parameters."""
    skip = {id(p) for m in exclude for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# ----------------------------------------------------------------------------- checkpoint mapping


def remap_state_dict(sd: dict, rules: list, reverse: bool = False, ignore: tuple = ()) -> dict:
    """Rename (and optionally transpose) state-dict entries by `rules`, a list of
    (our_name, other_name, transpose) where names may contain '{i}' for a layer index.
    reverse=False maps ours -> other. Keys matching a regex in `ignore` are dropped; any other
    key no rule knows is an error, so a silent half-loaded checkpoint cannot happen."""
    import re

    compiled = []
    for ours, other, transpose in rules:
        src, dst = (other, ours) if reverse else (ours, other)
        pattern = re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$")
        compiled.append((pattern, dst, transpose))
    out = {}
    for key, value in sd.items():
        if any(re.search(pat, key) for pat in ignore):
            continue
        for pattern, dst, transpose in compiled:
            m = pattern.match(key)
            if m:
                name = dst.replace("{i}", m.group(1)) if m.groups() else dst
                out[name] = value.t().contiguous() if transpose else value
                break
        else:
            raise KeyError(f"unexpected state-dict key {key!r}")
    return out
