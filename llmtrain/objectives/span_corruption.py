"""T5's span corruption for encoder-decoders: 15% of each window's tokens, in spans of mean
length 3, are cut out of the encoder input and replaced by one sentinel each; the decoder
predicts the spans, each after its sentinel:

    window   a b c d e f g h          (noise: c d, g)
    input    a b <X0> e f <X1> h </s>... as T5: the mask starts with a non-noise span and
    target   <X0> c d <X1> g </s>        ends with a noise span, so input = a b <X0> e f <X1> </s>

The mask is T5's random_spans_noise_mask, and the raw window length is T5's
compute_input_and_target_lengths for data.seq_len: every input row is exactly that long and
every target row exactly targets_length, so batches need no padding. Sentinel j is id
vocab - 1 - j, where vocab = tokenizer size + model.extra_ids (T5's <extra_id_j>).
Masks come from a generator keyed by (seed, step, rank) like the windows: a resumed run
sees the same batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.data.loader import sequential_windows, step_generator
from llmtrain.data.mixture import train_windows
from llmtrain.errors import UserError
from llmtrain.objectives.base import CorruptedWindows, Objective, encoder_decoder_loss, seq2seq_batch
from llmtrain.registry import register

TRAIN_KEY, VAL_KEY = 0x5350414E, 0x53505641


def lengths_for(tokens_length: int, noise_density: float, mean_span: float) -> tuple[int, int, int]:
    """(input length, target length, noise spans) of a window of tokens_length raw tokens,
    each length with its end-of-sequence token (T5's _tokens_length_to_inputs_length_targets_length)."""
    noise = int(round(tokens_length * noise_density))
    spans = int(round(noise / mean_span))
    return tokens_length - noise + spans + 1, noise + spans + 1, spans


def compute_input_and_target_lengths(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """T5's compute_input_and_target_lengths: the longest raw window whose corrupted input
    fits in inputs_length, and its target length."""
    tokens_length = inputs_length
    while lengths_for(tokens_length + 1, noise_density, mean_span)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length, _ = lengths_for(tokens_length, noise_density, mean_span)
    if noise_density == 0.5 and targets_length > inputs_length:  # as T5
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _segment(n_items: int, n_segments: int, g: torch.Generator) -> torch.Tensor:
    """Random positive lengths of n_segments segments summing to n_items (T5's _random_segmentation)."""
    first = torch.zeros(n_items, dtype=torch.long)
    first[torch.randperm(n_items - 1, generator=g)[: n_segments - 1] + 1] = 1
    return torch.bincount(first.cumsum(0), minlength=n_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float, g: torch.Generator) -> torch.Tensor:
    """T5's random_spans_noise_mask: bool [length], True = noise. Exactly round(length *
    noise_density) noise tokens in round(that / mean_span) spans, starting with non-noise."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span)), 1)
    n_spans = min(n_spans, n_noise, length - n_noise)
    noise = _segment(n_noise, n_spans, g)
    nonnoise = _segment(length - n_noise, n_spans, g)
    interleaved = torch.stack([nonnoise, noise], dim=1).reshape(-1)
    start = torch.zeros(length, dtype=torch.long)
    start[interleaved.cumsum(0)[:-1]] = 1
    return start.cumsum(0) % 2 == 1


def _collapse(tokens: torch.Tensor, mask: torch.Tensor, top_sentinel: int) -> torch.Tensor:
    """Each run of masked tokens -> one sentinel (top_sentinel, top_sentinel - 1, ...)."""
    prev = F.pad(mask[:-1], (1, 0))
    first = mask & ~prev
    sentinel = top_sentinel + 1 - first.long().cumsum(0)
    return torch.where(first, sentinel, tokens)[~(mask & prev)]


def corrupt(tokens: torch.Tensor, mask: torch.Tensor, top_sentinel: int, eos_id: int):
    """(input ids, target ids) of one window with its noise mask, as T5's span corruption."""
    eos = torch.tensor([eos_id], dtype=tokens.dtype)
    inputs = torch.cat([_collapse(tokens, mask, top_sentinel), eos])
    targets = torch.cat([_collapse(tokens, ~mask, top_sentinel), eos])
    return inputs, targets


@register("objective", "span_corruption")
class SpanCorruption(Objective):
    name = "span_corruption"
    needs_decoder = None
    needs_encoder_decoder = True
    supports_mixture = True

    def __init__(self, cfg, tokenizer, splits, data_cfg, seed, model_cfg=None):
        super().__init__(cfg, tokenizer, splits, data_cfg, seed, model_cfg)
        extra = model_cfg.extra_ids if model_cfg is not None else 0
        self.density, self.mean_span = cfg.noise_density, cfg.mean_span_length
        self.tokens_length, self.targets_length = compute_input_and_target_lengths(
            data_cfg.seq_len, self.density, self.mean_span
        )
        spans = lengths_for(self.tokens_length, self.density, self.mean_span)[2]
        if spans > extra:
            raise UserError(
                f"objective=span_corruption at data.seq_len={data_cfg.seq_len} needs {spans} sentinel ids, "
                f"but model.extra_ids={extra}"
            )
        if self.tokens_length < 2:
            raise UserError(f"data.seq_len={data_cfg.seq_len} is too short for span corruption")
        # <extra_id_0>: a tokenizer from a T5 directory has the sentinels in its vocabulary
        # already; ours end below them
        own = tokenizer.piece_id("<extra_id_0>")
        self.top_sentinel = own if own is not None else tokenizer.vocab_size + extra - 1

    def rows(self, windows: list[torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        pairs = []
        for w in windows:
            mask = random_spans_noise_mask(len(w), self.density, self.mean_span, g)
            pairs.append(corrupt(w, mask, self.top_sentinel, self.tokenizer.eos_id))
        return seq2seq_batch(pairs, self.tokenizer.pad_id)

    def train_source(self, rank=0, world=1):
        d = self.data_cfg
        windows = train_windows(self.splits.train, self.tokens_length - 1, d.batch_size, self.seed, rank, world)
        return CorruptedWindows(windows, self.rows, self.seed, TRAIN_KEY, rank)

    def val_batches(self, max_batches=0, rank=0, world=1):
        d = self.data_cfg
        windows = sequential_windows(self.splits.val, self.tokens_length - 1, d.batch_size, max_batches, rank, world)
        for i, w in enumerate(windows):
            n = (w["labels"] != -100).sum(1)
            rows = [torch.cat([x[:k], y[k - 1 : k]]) for x, y, k in zip(w["input_ids"], w["labels"], n.tolist()) if k]
            rows = [r for r in rows if len(r) >= 2]
            if rows:
                yield self.rows(rows, step_generator(self.seed, VAL_KEY, rank + i * world))

    def loss(self, model, batch):
        return encoder_decoder_loss(model, batch)
