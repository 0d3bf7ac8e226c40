"""BART's denoising for encoder-decoders (text infilling, optionally sentence permutation): of
each window of data.seq_len - 1 tokens, objective.noise_density (30%) is covered by spans whose
lengths are Poisson(objective.mean_span_length = 3); each span becomes one [MASK] in the
encoder input (a span of length 0 inserts a [MASK]). With objective.permute_sentences the
sentences (ending in . ! or ?) are shuffled first. The decoder reconstructs the original window
followed by </s>. Noise comes from a generator keyed by (seed, step, rank), as every objective."""

from __future__ import annotations

import torch

from llmtrain.data.loader import sequential_windows, step_generator
from llmtrain.data.mixture import train_windows
from llmtrain.errors import UserError
from llmtrain.objectives.base import CorruptedWindows, Objective, encoder_decoder_loss, seq2seq_batch
from llmtrain.registry import register

TRAIN_KEY, VAL_KEY = 0x42415254, 0x42415256


def sentence_end_ids(tokenizer) -> torch.Tensor:
    """Ids whose text ends a sentence (BART splits on the full stop)."""
    ends = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).rstrip().endswith((".", "!", "?"))]
    return torch.tensor(ends, dtype=torch.long)


def permute_sentences(tokens: torch.Tensor, end_ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    is_end = torch.isin(tokens, end_ids)
    cuts = (is_end.nonzero().squeeze(1) + 1).tolist()
    bounds = [0] + [c for c in cuts if c < len(tokens)] + [len(tokens)]
    sentences = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    order = torch.randperm(len(sentences), generator=g).tolist()
    return torch.cat([sentences[i] for i in order])


def infill(tokens: torch.Tensor, density: float, lam: float, mask_id: int, g: torch.Generator) -> torch.Tensor:
    """BART text infilling of one window: spans of Poisson(lam) lengths covering
    round(len * density) tokens, each replaced by one mask_id; 0-length spans insert one."""
    L = len(tokens)
    n_mask = int(round(L * density))
    if n_mask == 0:
        return tokens.clone()
    lengths: list[int] = []
    while sum(lengths) < n_mask:
        lengths += torch.poisson(torch.full((n_mask,), lam), generator=g).long().tolist()
    total, kept = 0, []
    for n in lengths:  # the first spans that reach n_mask tokens, the last one cut to fit
        if total >= n_mask:
            break
        kept.append(min(n, n_mask - total))
        total += kept[-1]
    starts = torch.randperm(L, generator=g)[: len(kept)].tolist()
    masked = torch.zeros(L, dtype=torch.bool)
    insert = set()
    for s, n in zip(starts, kept):
        if n == 0:
            insert.add(s)
        masked[s : s + n] = True
    out: list[int] = []
    ids = tokens.tolist()
    for i in range(L):
        if i in insert and not masked[i]:
            out.append(mask_id)
        if masked[i]:
            if i == 0 or not masked[i - 1]:
                out.append(mask_id)
        else:
            out.append(ids[i])
    return torch.tensor(out, dtype=torch.long)


@register("objective", "denoising")
class Denoising(Objective):
    name = "denoising"
    needs_decoder = None
    needs_encoder_decoder = True
    supports_mixture = True

    def __init__(self, cfg, tokenizer, splits, data_cfg, seed, model_cfg=None):
        super().__init__(cfg, tokenizer, splits, data_cfg, seed, model_cfg)
        # window + </s> is the target; the input (spans collapsed, a few inserts) fits data.seq_len
        self.window = data_cfg.seq_len - 1
        if self.window < 2:
            raise UserError(f"data.seq_len={data_cfg.seq_len} is too short for denoising")
        self.end_ids = sentence_end_ids(tokenizer) if cfg.permute_sentences else None

    def noised(self, clean: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = permute_sentences(clean, self.end_ids, g) if self.end_ids is not None else clean
        x = infill(x, self.cfg.noise_density, self.cfg.mean_span_length, self.tokenizer.mask_id, g)
        return x[: self.data_cfg.seq_len]

    def rows(self, windows: list[torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        eos = torch.tensor([self.tokenizer.eos_id])
        pairs = [(self.noised(w, g), torch.cat([w, eos])) for w in windows]
        return seq2seq_batch(pairs, self.tokenizer.pad_id)

    def train_source(self, rank=0, world=1):
        d = self.data_cfg
        windows = train_windows(self.splits.train, self.window - 1, d.batch_size, self.seed, rank, world)
        return CorruptedWindows(windows, self.rows, self.seed, TRAIN_KEY, rank)

    def val_batches(self, max_batches=0, rank=0, world=1):
        d = self.data_cfg
        windows = sequential_windows(self.splits.val, self.window - 1, d.batch_size, max_batches, rank, world)
        for i, w in enumerate(windows):
            n = (w["labels"] != -100).sum(1).tolist()
            rows = [torch.cat([x[:k], y[k - 1 : k]]) for x, y, k in zip(w["input_ids"], w["labels"], n) if k]
            if rows:
                yield self.rows(rows, step_generator(self.seed, VAL_KEY, rank + i * world))

    def loss(self, model, batch):
        return encoder_decoder_loss(model, batch)
