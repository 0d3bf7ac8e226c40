"""Autoregressive sampling and beam search from a decoder or an encoder-decoder (t5).

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

Encoder-decoders: a prompt is the encoder input (right padded, masked); the encoder runs once,
the decoder starts from the pad id and keeps its self-attention KV cache plus every layer's
cross-attention keys/values of the encoder output (use_cache=False re-decodes the whole prefix).
num_beams > 1: beam search (`beam_search`) for both families, through the same steppers.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llmtrain.errors import UserError
from llmtrain.models.prepack import MIN_NEW_TOKENS, prepacked
from llmtrain.threads import threads_for_decoding

__all__ = [
    "GenerationResult",
    "beam_search",
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
        # max's indices: the same first maximum as argmax, in a third of argmax's time at 50k
        return logits.max(dim=-1).indices
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
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens. For an
    encoder-decoder (t5) a prompt is the encoder input and the output starts after the decoder
    start id (pad). num_beams > 1: beam search (deterministic; the sampling keys are ignored).

    stop_fn(row, new_tokens) -> bool is an optional extra per-row stopping test, called after
    each new token (sample_text uses it for stop strings); unlike eos / stop_sequences it does
    not trim anything. See the module docstring for padding and the context limit."""
    enc_dec = bool(getattr(model, "is_encoder_decoder", False))
    if not getattr(model, "is_decoder", True) and not enc_dec:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise UserError(f"model {name!r} is not a decoder; generation needs a causal LM (gpt2, llama) or t5")
    if not prompts:
        return GenerationResult()
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
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
    if num_beams > 1 or enc_dec:
        args = (model, prompts, max_new_tokens, eos_id, pad_id, stops, stop_fn)
        start = time.perf_counter()
        if num_beams > 1:
            new = beam_search(*args, num_beams=num_beams, length_penalty=length_penalty)
        else:
            new = _sample_encoder_decoder(*args, temperature, top_k, top_p, generator, use_cache)
        return _result(new, time.perf_counter() - start)

    device = _device_of(model)
    if use_cache:
        # leave room for the new tokens, but keep at least half the context of each prompt
        budget = max(max_len - max_new_tokens, min(max_len // 2, max(len(p) for p in prompts)), 1)
    else:
        budget = max_len
    rows = [p[-budget:] for p in prompts]
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        # inference_mode, not just no_grad: less bookkeeping per op, which is most of a small
        # model's decoding step on a CPU; only token lists leave it
        # and the linear layers multiply by decoding-friendly copies of their weights (CPU only)
        fast = max_new_tokens >= MIN_NEW_TOKENS
        with torch.inference_mode(), prepacked(model, len(rows)) if fast else contextlib.nullcontext():
            new = _sample_decoder(
                model, rows, max_new_tokens, max_len, eos_id, pad_id, stops, stop_fn, temperature, top_k, top_p,
                generator, use_cache, device,
            )  # fmt: skip
    finally:
        model.train(was_training)
    return _result(new, time.perf_counter() - start)


def _last_logits(model, ids, mask, pos, cache) -> torch.Tensor:
    """Logits [B, V] of the last column only: the output head runs on one position per row, not
    on the whole prompt (at a 50k vocabulary that head is most of a long prompt's cost)."""
    if hasattr(model, "encode") and hasattr(model, "lm_logits"):
        h = model.encode(ids, attention_mask=mask, position_ids=pos, kv_cache=cache)
        return model.lm_logits(h[:, -1])
    return model(ids, attention_mask=mask, position_ids=pos, kv_cache=cache)[:, -1]


def _sample_decoder(
    model, rows, max_new_tokens, max_len, eos_id, pad_id, stops, stop_fn, temperature, top_k, top_p, generator,
    use_cache, device,
) -> list[list[int]]:  # fmt: skip
    """generate's loop for a decoder. The token and mask buffers are allocated once for the whole
    run (prompt + max_new_tokens columns) and filled in place; the KV cache is preallocated too.
    The host reads the new tokens once per step only when a stopping rule has to look at them
    (eos, stop sequences, stop_fn); otherwise they stay on the device until the end."""
    B = len(rows)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    L = max(len(r) for r in rows)
    total = L + max_new_tokens
    ids = torch.full((B, total), pad_id, dtype=torch.long)
    mask = torch.zeros((B, total), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r) : L] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r) :] = 1  # the new columns are real tokens (a finished row's are ignored)
    ids, mask = ids.to(device), mask.to(device)
    padded = any(len(r) < L for r in rows)  # no padding: pass no mask (faster SDPA kernels)
    pos_all = _positions(mask)
    watch = eos_id is not None or bool(stops) or stop_fn is not None
    done_t = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.empty((B, max_new_tokens if not watch else 0), dtype=torch.long, device=device)
    cache = None
    if use_cache and max_new_tokens > 0:
        cache = model.new_kv_cache(B, min(max_len, total), device=device)
    past = 0  # positions already in the cache
    n = 0  # tokens generated so far (columns of `out`)
    with contextlib.ExitStack() as stack:
        for step in range(max_new_tokens):
            if step == 1 and device.type == "cpu" and cache is not None:
                # one-token steps: fewer threads while other processes keep cores busy (the same
                # tokens: a one-row step's products do not depend on the thread count)
                stack.enter_context(threads_for_decoding())
            cur = L + step  # columns filled so far
            if cache is not None and cur > cache.max_len:
                cache = None  # cache full: continue with the sliding window
                stack.close()  # whole windows again: the caller's thread count
            if cache is not None:
                logits = _last_logits(
                    model, ids[:, past:cur], mask[:, :cur] if padded else None, pos_all[:, past:cur], cache
                )
                past = cur
            else:
                lo = max(0, cur - max_len)
                win_mask = mask[:, lo:cur]
                win_pos = _positions(win_mask) if lo else pos_all[:, :cur]
                logits = _last_logits(model, ids[:, lo:cur], win_mask if padded else None, win_pos, None)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            n = step + 1
            if not watch:
                out[:, step] = nxt
            else:
                _accept(nxt.tolist(), new, done, eos_id, stops, stop_fn)  # the one host sync per step
                if all(done):
                    break
                if any(done):
                    done_t = torch.tensor(done, device=device)
            if step == max_new_tokens - 1:
                break
            # finished rows keep being fed (pad_id) so the batch stays rectangular; their outputs are ignored
            ids[:, cur] = nxt.masked_fill(done_t, pad_id) if watch else nxt
    if not watch:
        new = out[:, :n].tolist()
    return new


def _result(new: list[list[int]], seconds: float) -> GenerationResult:
    n = sum(len(t) for t in new)
    return GenerationResult(
        tokens=new, num_generated=n, seconds=seconds, tokens_per_second=n / seconds if seconds > 0 else 0.0
    )


def _accept(nxt: list[int], new: list[list[int]], done: list[bool], eos_id, stops, stop_fn) -> None:
    """Append each unfinished row's next token; a row ends at eos (not kept), at a stop sequence
    (cut off) or when stop_fn says so."""
    for i, t in enumerate(nxt):
        if done[i]:
            continue
        t = int(t)
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


# ----------------------------------------------------------------------------- steppers
# A stepper owns a batch of rows being decoded: first() gives the logits of each row's next
# token, step(tokens) feeds one token per row and gives the next logits, reorder(index) makes
# row i a copy of row index[i] (beam search). The cached ones keep a KV cache; t5's also keeps
# its encoder output's cross-attention keys/values, computed once.


class _EncDecStepper:
    def __init__(self, model, prompts: list[list[int]], pad_id: int, max_new: int, repeat: int = 1, cache=True):
        device = _device_of(model)
        S = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), S), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p, dtype=torch.long), 1
        ids, mask = ids.to(device), mask.to(device)
        self.model, self.pad_id = model, pad_id
        self.mask = mask.repeat_interleave(repeat, 0) if not bool(mask.all()) else None
        # the encoder runs once, on the distinct prompts; beams share their prompt's output
        self.memory = model.encode(ids, mask if self.mask is not None else None).repeat_interleave(repeat, 0)
        n = self.memory.shape[0]
        self.cross = model.cross_kv(self.memory) if cache else None
        self.cache = model.new_kv_cache(n, max_new + 1, device=device) if cache else None
        self.dec = torch.full((n, 1), pad_id, dtype=torch.long, device=device)  # decoder start: pad

    def _logits(self, x):
        if self.cache is not None:
            h = self.model.decode(x, memory_mask=self.mask, kv_cache=self.cache, cross_kv=self.cross)
        else:
            h = self.model.decode(self.dec, self.memory, self.mask)
        return self.model.lm_logits(h[:, -1]).float()

    def first(self):
        return self._logits(self.dec)

    def step(self, tokens: torch.Tensor):
        self.dec = torch.cat([self.dec, tokens.to(self.dec.device)[:, None]], dim=1)
        return self._logits(self.dec[:, -1:])

    def reorder(self, index: torch.Tensor) -> None:
        index = index.to(self.dec.device)
        self.dec = self.dec.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)  # beams stay inside their prompt: the cross K/V stay as they are


class _DecoderStepper:
    """Left-padded prompts with a KV cache (as generate's cached path)."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, max_new: int, repeat: int = 1):
        device = _device_of(model)
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), L), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p) :], mask[i, L - len(p) :] = torch.tensor(p, dtype=torch.long), 1
        self.ids = ids.repeat_interleave(repeat, 0).to(device)
        self.mask = mask.repeat_interleave(repeat, 0).to(device)
        self.padded = not bool(mask.all())
        self.model = model
        self.cache = model.new_kv_cache(self.ids.shape[0], L + max_new, device=device)

    def _run(self, x, pos):
        out = self.model(x, attention_mask=self.mask if self.padded else None, position_ids=pos, kv_cache=self.cache)
        return out[:, -1].float()

    def first(self):
        return self._run(self.ids, _positions(self.mask))

    def step(self, tokens: torch.Tensor):
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self._run(tokens.to(self.mask.device)[:, None], _positions(self.mask)[:, -1:])

    def reorder(self, index: torch.Tensor) -> None:
        index = index.to(self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.cache.reorder(index)


def _room(model, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], int]:
    """Decoder prompts cropped from the left (never below half the context) and the new-token
    budget that fits the model's context."""
    max_len = int(getattr(getattr(model, "config", None), "max_seq_len", 0) or 0) or 10**9
    budget = max(max_len - max_new_tokens, min(max_len // 2, max(len(p) for p in prompts)), 1)
    prompts = [p[-budget:] for p in prompts]
    return prompts, max(0, min(max_new_tokens, max_len - max(len(p) for p in prompts)))


def _stepper(model, prompts, pad_id, max_new, repeat=1):
    if getattr(model, "is_encoder_decoder", False):
        return _EncDecStepper(model, prompts, pad_id, max_new, repeat)
    return _DecoderStepper(model, prompts, pad_id, max_new, repeat)


@torch.no_grad()
def _sample_encoder_decoder(
    model, prompts, max_new_tokens, eos_id, pad_id, stops, stop_fn, temperature, top_k, top_p, generator, use_cache
) -> list[list[int]]:
    B = len(prompts)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    was_training = model.training
    model.eval()
    try:
        st = _EncDecStepper(model, prompts, pad_id, max_new_tokens, cache=use_cache)
        logits = st.first() if max_new_tokens > 0 else None
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            _accept(nxt.tolist(), new, done, eos_id, stops, stop_fn)
            if all(done) or step == max_new_tokens - 1:
                break
            logits = st.step(torch.where(torch.tensor(done, device=nxt.device), pad_id, nxt))
    finally:
        model.train(was_training)
    return new


@torch.no_grad()
def beam_search(
    model, prompts, max_new_tokens, eos_id, pad_id, stops, stop_fn, *, num_beams: int, length_penalty: float = 1.0
) -> list[list[int]]:
    """The best of num_beams beams per prompt, by sum of log-probabilities / length**length_penalty
    (length in new tokens, eos counted), as HF's beam scorer. A beam ends at eos (not kept), at
    a stop sequence (cut off) or when stop_fn says so; a prompt is done once num_beams beams
    have ended (HF's early_stopping=True), else its best running beams count at the end. With
    one beam this is greedy decoding."""
    K = num_beams
    B = len(prompts)
    if not getattr(model, "is_encoder_decoder", False):
        prompts, max_new_tokens = _room(model, prompts, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        st = _stepper(model, prompts, pad_id, max_new_tokens, repeat=K)
        beams: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
        scores = torch.full((B, K), float("-inf"))
        scores[:, 0] = 0.0  # all beams start equal: expand the first one only
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [max_new_tokens == 0] * B
        logits = st.first() if max_new_tokens > 0 else None

        def ended(b: int, seq: list[int]) -> list[int] | None:
            for s in stops:
                if _ends_with(seq, s):
                    return seq[: -len(s)]
            return seq if stop_fn is not None and stop_fn(b, seq) else None

        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            V = logp.shape[-1]
            cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
            top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
            index, tokens = [], []
            new_scores = torch.full((B, K), float("-inf"))
            for b in range(B):
                if done[b]:  # keep feeding its rows; their output is ignored
                    index += [b * K + k for k in range(K)]
                    tokens += [pad_id] * K
                    continue
                picked = []
                for rank, (sc, ix) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist())):
                    k, t = divmod(ix, V)
                    seq = beams[b][k] + [t]
                    if eos_id is not None and t == eos_id:
                        if rank < K:  # as HF: an eos beyond the first K candidates does not count
                            finished[b].append((sc / len(seq) ** length_penalty, beams[b][k]))
                        continue
                    cut = ended(b, seq)
                    if cut is not None:
                        finished[b].append((sc / len(seq) ** length_penalty, cut))
                        continue
                    picked.append((sc, k, t, seq))
                    if len(picked) == K:
                        break
                last = step == max_new_tokens - 1
                if len(finished[b]) >= K or not picked or last:
                    done[b] = True
                    if len(finished[b]) < K:  # running beams count too, when the prompt has to stop
                        finished[b] += [(sc / len(seq) ** length_penalty, seq) for sc, _, _, seq in picked]
                picked += [picked[-1]] * (K - len(picked)) if picked else []
                for j, (sc, k, t, seq) in enumerate(picked):
                    index.append(b * K + k)
                    tokens.append(t)
                    beams[b][j] = seq
                    new_scores[b, j] = sc if j == 0 or picked[j] is not picked[j - 1] else float("-inf")
                if not picked:
                    index += [b * K + k for k in range(K)]
                    tokens += [pad_id] * K
            if all(done):
                break
            scores = new_scores
            st.reorder(torch.tensor(index))
            logits = st.step(torch.tensor(tokens))
    finally:
        model.train(was_training)
    out = []
    for b in range(B):
        best = max(finished[b], key=lambda x: x[0]) if finished[b] else (0.0, [])
        out.append(best[1])
    return out


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
