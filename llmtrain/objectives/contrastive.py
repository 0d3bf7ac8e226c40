"""Contrastive sentence embeddings for encoders (SimCSE, Gao et al. 2021).

A sentence is `[CLS] tokens [SEP]`; its embedding is the mean of its token states
(objective.pooling=mean, padding left out) or the [CLS] state (cls). The loss is InfoNCE over
cosine similarities divided by objective.temperature, with the other sentences of the batch as
negatives:

- unsupervised (default; data.path holds one sentence per line or record): each sentence is
  encoded twice in one forward pass, and dropout makes the two views differ; a view's positive is
  the other view of the same sentence. It needs model.dropout > 0.
- supervised (objective.pair_columns=[A, B, score]): the sentence pairs of data.path. A pair
  scoring >= objective.positive_threshold is a positive (A's positive is B). A pair scoring <=
  objective.hard_negative_threshold (null: none) makes B a hard negative, and A's positive is its
  own second dropout view; pairs in between are not trained on (they are neither).

Batches are a function of (seed, step, rank) like every objective; dropout draws from torch's
RNG, which the trainer saves with each checkpoint, so a resumed run is bit-exact.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from llmtrain.data.loader import step_generator
from llmtrain.data.sentences import read_pairs, read_sentences
from llmtrain.data.validation import shard
from llmtrain.errors import UserError
from llmtrain.objectives.base import LossOutput, Objective
from llmtrain.registry import register
from llmtrain.tokenizers import Tokenizer

POOLINGS = ("mean", "cls")
TRAIN_KEY = 0x53494D  # the example order's random stream


def check_pooling(value: str, key: str) -> str:
    if value not in POOLINGS:
        raise UserError(f"{key} must be one of {', '.join(POOLINGS)}, got {value!r}")
    return value


def checkpoint_pooling(meta: dict) -> str:
    """The pooling a checkpoint was trained with: its contrastive objective's, else mean."""
    if meta.get("objective") != "contrastive":
        return "mean"
    return str(((meta.get("config") or {}).get("objective") or {}).get("pooling") or "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, D] token states -> [B, D] sentence vectors: masked mean, or the [CLS] state."""
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def frame_sentences(rows: list[list[int]], tok: Tokenizer) -> dict[str, torch.Tensor]:
    """[CLS] ids [SEP] per row, right-padded to the longest row of the batch."""
    T = max(len(r) for r in rows) + 2
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r) + 2] = torch.tensor([tok.cls_id, *r, tok.sep_id], dtype=torch.long)
        attn[i, : len(r) + 2] = 1
    return {"input_ids": ids, "attention_mask": attn, "token_type_ids": torch.zeros_like(ids)}


def tokenize(tok: Tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each text, cut so that [CLS] and [SEP] fit in max_len."""
    if max_len < 3:
        raise UserError(f"data.seq_len={max_len} is too short for a sentence: [CLS] and [SEP] need 2 tokens")
    return [tok.encode(t)[: max_len - 2] for t in texts]


def sentence_vectors(model, batch: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return pool(hidden, batch["attention_mask"], pooling)


@torch.no_grad()
def embed_texts(
    model, tok: Tokenizer, texts: list[str], pooling: str, device, batch_size: int = 64, max_len: int | None = None
) -> torch.Tensor:
    """[len(texts), D] float32 embeddings, in order (eval mode: dropout off)."""
    model.eval()
    max_len = max_len or int(model.config.max_seq_len)
    rows = tokenize(tok, texts, max_len)
    out = []
    for s in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in frame_sentences(rows[s : s + batch_size], tok).items()}
        out.append(sentence_vectors(model, batch, pooling).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, int(model.config.d_model)))


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float):
    """InfoNCE: anchor i's positive is candidates[i]; every other candidate is a negative.
    Returns (mean loss, number of anchors whose positive is the most similar candidate)."""
    sim = F.normalize(anchors.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T / temperature
    labels = torch.arange(anchors.size(0), device=anchors.device)
    return F.cross_entropy(sim, labels), (sim.argmax(-1) == labels).sum()


def _read_rows(cfg, data_cfg) -> list[tuple[str, str | None, bool]]:
    """(A, B or None, positive) per example: B None = A's positive is its own second view."""
    if not cfg.pair_columns:
        sentences = read_sentences(data_cfg.path, data_cfg.text_field, data_cfg.encoding_errors)
        return [(s, None, True) for s in sentences]
    pairs = read_pairs(data_cfg.path, list(cfg.pair_columns), "data.path", data_cfg.encoding_errors)
    negative = cfg.hard_negative_threshold
    return [
        (p.a, p.b, p.score >= cfg.positive_threshold)
        for p in pairs
        if p.score >= cfg.positive_threshold or (negative is not None and p.score <= negative)
    ]


class ExampleOrder:
    """Training batches: examples reshuffled each epoch; batch(step) depends on (seed, step, rank)."""

    def __init__(self, examples: list, batch_size: int, collate, seed: int, rank: int, world: int):
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.seed, self.rank, self.world = seed, rank, world
        self._perm: tuple[int, torch.Tensor] | None = None

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        first = (step * self.world + self.rank) * self.batch_size
        picked = []
        for g in range(first, first + self.batch_size):
            epoch, idx = divmod(g, len(self.examples))
            if self._perm is None or self._perm[0] != epoch:
                gen = step_generator(self.seed, TRAIN_KEY, epoch)
                self._perm = (epoch, torch.randperm(len(self.examples), generator=gen))
            picked.append(self.examples[int(self._perm[1][idx])])
        return self.collate(picked)


@register("objective", "contrastive")
class Contrastive(Objective):
    name = "contrastive"
    needs_decoder = False
    reads_own_data = True  # sentences or pairs from data.path, not the packed token stream

    def __init__(self, cfg, tokenizer, splits, data_cfg, seed):
        super().__init__(cfg, tokenizer, splits, data_cfg, seed)
        check_pooling(cfg.pooling, "objective.pooling")
        rows = _read_rows(cfg, data_cfg)
        n_val = round(data_cfg.val_fraction * len(rows)) if data_cfg.val_fraction > 0 else 0
        n_val = max(n_val, 1) if data_cfg.val_fraction > 0 else 0
        if len(rows) - n_val < 2:
            raise UserError(
                f"data {data_cfg.path}: {len(rows)} examples are too few to train on (need 2 besides validation)"
            )
        ids_a = tokenize(tokenizer, [r[0] for r in rows], data_cfg.seq_len)
        ids_b = tokenize(tokenizer, [r[1] or "" for r in rows], data_cfg.seq_len)
        examples = [(a, b if r[1] is not None else None, r[2]) for a, b, r in zip(ids_a, ids_b, rows)]
        self.train, self.val = examples[: len(rows) - n_val], examples[len(rows) - n_val :]
        self.n_positive = sum(1 for r in rows if r[2])

    @staticmethod
    def texts(cfg, data_cfg) -> list[str]:
        """The text of data.path, for a tokenizer trained from scratch."""
        return [t for a, b, _ in _read_rows(cfg, data_cfg) for t in (a, b) if t]

    def prepare_model(self, model, model_cfg) -> None:
        """Called by the stage before training: refuse a model the objective cannot train (the
        stage then freezes the heads the loss does not reach: llmtrain.train.freeze)."""
        if not self.cfg.pair_columns and model_cfg.dropout <= 0:
            raise UserError(
                "objective=contrastive (unsupervised) needs model.dropout > 0: the two views of a sentence "
                "differ only by dropout (e.g. model.dropout=0.1)"
            )

    def summary(self) -> str:
        kind = "pairs" if self.cfg.pair_columns else "sentences"
        extra = f" ({self.n_positive:,} positive)" if self.cfg.pair_columns else ""
        return f"{len(self.train):,} train / {len(self.val):,} val {kind}{extra}"

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        anchors = [a for a, _, _ in examples]
        targets = [b if b is not None and pos else a for a, b, pos in examples]
        negatives = [b for _, b, pos in examples if b is not None and not pos]
        batch = frame_sentences(anchors + targets + negatives, self.tokenizer)
        batch["labels"] = torch.arange(len(anchors))  # its length says how many rows are anchors
        return batch

    def train_source(self, rank=0, world=1):
        return ExampleOrder(self.train, self.data_cfg.batch_size, self.collate, self.seed, rank, world)

    def val_batches(self, max_batches=0, rank=0, world=1) -> Iterator[dict[str, torch.Tensor]]:
        for _, chunk in shard(self.val, self.data_cfg.batch_size, max_batches, rank, world):
            yield self.collate(chunk)

    def loss(self, model, batch):
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        z = pool(hidden, batch["attention_mask"], self.cfg.pooling)
        n = batch["labels"].size(0)
        loss, correct = info_nce(z[:n], z[n:], self.cfg.temperature)  # the heads are frozen: prepare_model
        count = torch.full((), n, device=z.device)
        return LossOutput(loss=loss, n_targets=count, extras={"contrastive_accuracy": (correct.detach(), count)})
