"""Autoregressive sampling from a decoder model.

`generate` runs a batch of token-id prompts at once. Prompts of different lengths are LEFT
padded (so every row's next token is the last column), with an attention mask that hides the
padding and explicit position_ids that count only real tokens, so a prompt generates the same
tokens in a batch as it does alone.

Context limit (model.config.max_seq_len):
  * use_cache=False: every step re-runs the model on a sliding window of the last max_seq_len
    tokens (positions restart at 0 inside the window).
  * use_cache=True: the KV cache holds max_seq_len positions. Prompts that leave less than
    max_new_tokens of room are cropped from the LEFT to make room, but never below half the
    context (max_seq_len // 2 tokens), so a large max_new_tokens does not erase the prompt.
    If the cache still fills up, generation goes on with the sliding window above (no cache)
    instead of stopping, so both modes always return up to max_new_tokens tokens.

Decoding: greedy when temperature == 0, otherwise softmax(logits / temperature) after the
top-k and top-p (nucleus) filters. A row stops at eos_id or at one of stop_sequences (neither
is included in its output); the whole batch stops when every row has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llmtrain.errors import UserError

__all__ = [
    "GenerationResult",
    "generate",
    "sample_next",
    "sample_text",
    "top_k_filter",
    "top_p_filter",
]


@dataclass
class GenerationResult:
    """New tokens per prompt (prompt excluded, cut before eos / a stop sequence)."""

    tokens: list[list[int]] = field(default_factory=list)
    num_generated: int = 0  # sum of len(t) for t in tokens
    seconds: float = 0.0
    tokens_per_second: float = 0.0


# ----------------------------------------------------------------------------- sampling


def top_k_filter(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Set every logit below the k-th largest (per row, last dim) to -inf. k None/<=0: no-op."""
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is
    >= p (always at least the top token); set the rest to -inf. p None or >= 1: no-op."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # mass of the tokens strictly before each one; a token is needed while that mass is < p
    before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. temperature == 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # a CPU generator with a CUDA model (or the reverse): sample where the generator lives
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- generate


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of each column counting only real tokens (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _ends_with(seq: list[int], suffix: list[int]) -> bool:
    n = len(suffix)
    return 0 < n <= len(seq) and seq[-n:] == suffix


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    stop_sequences: Optional[list[list[int]]] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    stop_fn: Optional[Callable[[int, list[int]], bool]] = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.

    stop_fn(row, new_tokens) -> bool is an optional extra per-row stopping test, called after
    each new token (sample_text uses it for stop strings); unlike eos / stop_sequences it does
    not trim anything. See the module docstring for padding and the context limit."""
    if not getattr(model, "is_decoder", True):
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise UserError(f"model {name!r} is not a decoder; generation needs a causal LM (gpt2, llama)")
    if not prompts:
        return GenerationResult()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    config = getattr(model, "config", None)
    max_len = int(getattr(config, "max_seq_len", 0) or 0) or 10**9
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab and any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"generate: prompt token ids must be in [0, {vocab})")
    stops = [list(s) for s in (stop_sequences or []) if len(s) > 0]

    device = _device_of(model)
    B = len(prompts)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    if use_cache:
        # leave room for the new tokens, but keep at least half the context of each prompt
        budget = max(max_len - max_new_tokens, min(max_len // 2, max(len(p) for p in prompts)), 1)
    else:
        budget = max_len
    rows = [p[-budget:] for p in prompts]
    L = max(len(r) for r in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = any(len(r) < L for r in rows)  # no padding: pass no mask (faster SDPA kernels)

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        cache = None
        if use_cache and max_new_tokens > 0:
            cache = model.new_kv_cache(B, min(max_len, L + max_new_tokens), device=device)
        past = 0  # positions already in the cache
        for step in range(max_new_tokens):
            if cache is not None and ids.shape[1] > cache.max_len:
                cache = None  # cache full: continue with the sliding window
            if cache is not None:
                x = ids[:, past:]
                logits = model(
                    x, attention_mask=mask if padded else None, position_ids=_positions(mask)[:, past:], kv_cache=cache
                )
                past = ids.shape[1]
            else:
                win_ids, win_mask = ids[:, -max_len:], mask[:, -max_len:]
                logits = model(win_ids, attention_mask=win_mask if padded else None, position_ids=_positions(win_mask))
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            nxt_list = nxt.tolist()
            for i in range(B):
                if done[i]:
                    continue
                t = int(nxt_list[i])
                if eos_id is not None and t == eos_id:
                    done[i] = True
                    continue
                new[i].append(t)
                for s in stops:
                    if _ends_with(new[i], s):
                        del new[i][-len(s) :]
                        done[i] = True
                        break
                if not done[i] and stop_fn is not None and stop_fn(i, new[i]):
                    done[i] = True
            if all(done) or step == max_new_tokens - 1:
                break
            # finished rows keep being fed (pad_id) so the batch stays rectangular; their
            # outputs are ignored
            fill = torch.tensor(
                [pad_id if done[i] else int(nxt_list[i]) for i in range(B)], dtype=torch.long, device=device
            )
            ids = torch.cat([ids, fill[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    n = sum(len(t) for t in new)
    return GenerationResult(
        tokens=new, num_generated=n, seconds=seconds, tokens_per_second=n / seconds if seconds > 0 else 0.0
    )


# ----------------------------------------------------------------------------- text


def trim_at_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stop_strings if s]
    hits = [h for h in hits if h >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def sample_text(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: Optional[float] = None,
    stop_strings: Optional[list[str]] = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    include_prompt: bool = False,
) -> str:
    """Generate a continuation of `prompt` and return it as text (without the prompt unless
    include_prompt). Generation stops at the tokenizer's eos (if stop_at_eos) and as soon as
    the decoded text contains one of stop_strings; the text is trimmed at the first stop
    string, which is not included. An empty prompt starts from the tokenizer's bos token."""
    ids = tokenizer.encode(prompt)
    if not ids:
        start = getattr(tokenizer, "bos_id", None)
        if start is None:
            start = tokenizer.eos_id
        ids = [start]
    stops = [s for s in (stop_strings or []) if s]
    stop_fn = None
    if stops:

        def stop_fn(_row: int, new: list[int]) -> bool:
            return trim_at_stop(tokenizer.decode(new), stops)[1]

    res = generate(
        model,
        [ids],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=getattr(tokenizer, "eos_id", None) if stop_at_eos else None,
        pad_id=getattr(tokenizer, "pad_id", 0) or 0,
        use_cache=use_cache,
        generator=generator,
        stop_fn=stop_fn,
    )
    text = tokenizer.decode(res.tokens[0])
    if stops:
        text = trim_at_stop(text, stops)[0]
    return prompt + text if include_prompt else text
