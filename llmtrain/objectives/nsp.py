"""Next-sentence prediction (BERT) and BERT's joint MLM + NSP pretraining.

A pair is `[CLS] A [SEP] B [SEP]` (token types 0 then 1, padded to data.seq_len): A is a span
of a document and B is, with probability objective.nsp_prob, the span that follows it in the
same document (label 0, as in Hugging Face), otherwise a span of another document (label 1).
Documents are delimited by the eos token that the corpus appends to each one, so NSP needs
data with several documents (e.g. data=wikitext2, whose data.doc_pattern splits articles).
The negative B has the same length as the positive one would, so length gives nothing away.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llmtrain.data.loader import step_generator
from llmtrain.data.validation import shard
from llmtrain.errors import UserError
from llmtrain.objectives.base import LossOutput, Objective
from llmtrain.objectives.mlm import (
    TRAIN_MASK_KEY,
    VAL_MASK_KEY,
    Masker,
    check_seq_len,
    frame,
    keep_params_in_graph,
    masked_lm_terms,
)
from llmtrain.registry import register
from llmtrain.tokenizers import Tokenizer

TRAIN_PAIR_KEY, VAL_PAIR_KEY = 0x4E5350, 0x4E5356


def document_spans(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each document's text (eos excluded) in a concatenated token array."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    if len(ends) == 0 or ends[-1] != len(tokens) - 1:
        ends = np.append(ends, len(tokens))  # text after the last eos (a position-split tail)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts
    keep = lengths >= 2  # a pair needs at least one token on each side
    return starts[keep], lengths[keep]


def _randint(high: int, g: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=g))


class PairMaker:
    """Builds NSP pairs from the documents of one split."""

    def __init__(self, tokens: np.ndarray, tok: Tokenizer, seq_len: int, nsp_prob: float, split: str):
        if not 0.0 <= nsp_prob <= 1.0:
            raise UserError(f"objective.nsp_prob must be in [0, 1], got {nsp_prob}")
        check_seq_len(seq_len, 3)
        self.tokens = tokens  # kept as given (possibly a memory-mapped split); spans are read on demand
        self.starts, self.lengths = document_spans(tokens, tok.eos_id)
        if len(self.starts) < 2:
            raise UserError(
                f"next-sentence prediction needs at least 2 documents in the {split} split, found "
                f"{len(self.starts)}: use data with several documents (data.doc_pattern, several "
                f"files or records; e.g. data=wikitext2)"
            )
        self.cum = np.concatenate([[0], np.cumsum(self.lengths)])  # document offsets in "text only" order
        self.tok, self.seq_len, self.nsp_prob = tok, seq_len, nsp_prob
        self.budget = seq_len - 3  # text tokens per pair: [CLS] A [SEP] B [SEP]

    def span(self, d: int, start: int, n: int) -> torch.Tensor:
        """Up to n tokens of document d from `start` (only these are read from a memory map)."""
        s = int(self.starts[d]) + start
        end = min(s + n, int(self.starts[d] + self.lengths[d]))
        return torch.from_numpy(np.asarray(self.tokens[s:end], dtype=np.int64))

    def pair(self, d: int, start: int, n: int, g: torch.Generator):
        """(A, B, label) for the n-token span of document d at `start`, split at a random point."""
        text = self.span(d, start, n)
        n = len(text)
        cut = 1 + _randint(n - 1, g)  # 1 <= |A| <= n - 1
        a = text[:cut]
        if float(torch.rand((), generator=g)) < self.nsp_prob:
            return a, text[cut:], 0
        # Another document, chosen in proportion to its length: a uniform position in the
        # other documents' text, skipping document d.
        pos = _randint(int(self.cum[-1] - self.lengths[d]), g)
        if pos >= self.cum[d]:
            pos += int(self.lengths[d])
        other = int(np.searchsorted(self.cum, pos, side="right") - 1)
        want = n - cut
        s = _randint(max(int(self.lengths[other]) - want, 0) + 1, g)
        return a, self.span(other, s, want), 1

    def batch(self, spans: list[tuple[int, int, int]], g: torch.Generator) -> dict[str, torch.Tensor]:
        firsts, seconds, labels = [], [], []
        for d, start, n in spans:
            a, b, label = self.pair(d, start, n, g)
            firsts.append(a), seconds.append(b), labels.append(label)
        batch = frame(firsts, seconds, self.seq_len, self.tok)
        batch["next_sentence_label"] = torch.tensor(labels, dtype=torch.long)
        return batch

    def random_spans(self, batch_size: int, g: torch.Generator) -> list[tuple[int, int, int]]:
        """Training spans: a document in proportion to its length, a uniform start within it."""
        spans = []
        for _ in range(batch_size):
            d = int(np.searchsorted(self.cum, _randint(int(self.cum[-1]), g), side="right") - 1)
            n = min(self.budget, int(self.lengths[d]))
            spans.append((d, _randint(int(self.lengths[d]) - n + 1, g), n))
        return spans

    def sequential_spans(self) -> list[tuple[int, int, int]]:
        """Validation spans: each document cut into consecutive budget-sized pieces."""
        spans = []
        for d, length in enumerate(self.lengths.tolist()):
            for s in range(0, length, self.budget):
                if length - s >= 2:
                    spans.append((d, s, min(self.budget, length - s)))
        return spans


class PairSource:
    """Training batches of NSP pairs (masked too when `masker` is given), keyed by (seed, step, rank)."""

    def __init__(self, maker: PairMaker, batch_size: int, masker: Masker | None, seed: int, rank: int):
        self.maker, self.batch_size, self.masker, self.seed, self.rank = maker, batch_size, masker, seed, rank

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = step_generator(self.seed, TRAIN_PAIR_KEY, step, self.rank)
        batch = self.maker.batch(self.maker.random_spans(self.batch_size, g), g)
        if self.masker is not None:
            mg = step_generator(self.seed, TRAIN_MASK_KEY, step, self.rank)
            self.masker.apply(batch, mg)
        return batch


def pair_val_batches(
    maker: PairMaker, batch_size: int, masker: Masker | None, max_batches: int, rank: int, world: int, seed: int
):
    """The validation documents once, in order; pairing and masks fixed by (seed, batch index)."""
    for bi, spans in shard(maker.sequential_spans(), batch_size, max_batches, rank, world):
        batch = maker.batch(spans, step_generator(seed, VAL_PAIR_KEY, bi))
        if masker is not None:
            masker.apply(batch, step_generator(seed, VAL_MASK_KEY, bi))
        yield batch


def nsp_terms(logits: torch.Tensor, labels: torch.Tensor):
    ce = F.cross_entropy(logits.float(), labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum()
    return ce, correct, torch.ones_like(labels).sum()


@register("objective", "nsp")
class NextSentence(Objective):
    name = "nsp"
    needs_decoder = False
    token_loss = False  # a loss per sentence pair (and, for mlm_nsp, plus the MLM loss)
    masked = False  # mlm_nsp also masks the pairs

    def __init__(self, cfg, tokenizer, splits, data_cfg, seed):
        super().__init__(cfg, tokenizer, splits, data_cfg, seed)
        self.masker = Masker(tokenizer, cfg.mask_prob) if self.masked else None

    def _maker(self, tokens, split: str) -> PairMaker:
        return PairMaker(tokens, self.tokenizer, self.data_cfg.seq_len, self.cfg.nsp_prob, split)

    def train_source(self, rank=0, world=1):
        maker = self._maker(self.splits.train, "train")
        return PairSource(maker, self.data_cfg.batch_size, self.masker, self.seed, rank)

    def val_batches(self, max_batches=0, rank=0, world=1):
        maker = self._maker(self.splits.val, "validation")
        return pair_val_batches(maker, self.data_cfg.batch_size, self.masker, max_batches, rank, world, self.seed)

    def loss(self, model, batch):
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        ce, correct, n = nsp_terms(model.nsp_logits(hidden), batch["next_sentence_label"])
        loss = keep_params_in_graph(model, hidden, ce / n, "mlm")
        return LossOutput(loss=loss, n_targets=n, extras={"nsp_accuracy": (correct.detach(), n)})


@register("objective", "mlm_nsp")
class MaskedLMNextSentence(NextSentence):
    """BERT's pretraining loss: mean MLM cross-entropy + mean NSP cross-entropy per batch."""

    name = "mlm_nsp"
    masked = True

    def loss(self, model, batch):
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        mlm_ce, mlm_correct, n_mlm = masked_lm_terms(model, hidden, batch, self.chunked_loss)
        nsp_ce, nsp_correct, n_pairs = nsp_terms(model.nsp_logits(hidden), batch["next_sentence_label"])
        loss = mlm_ce / n_mlm.clamp(min=1) + nsp_ce / n_pairs
        extras = {  # (sum, count): the trainer reports sum / count over the whole validation set
            "mlm_loss": (mlm_ce.detach(), n_mlm),
            "nsp_loss": (nsp_ce.detach(), n_pairs),
            "mlm_accuracy": (mlm_correct.detach(), n_mlm),
            "nsp_accuracy": (nsp_correct.detach(), n_pairs),
        }
        # n_targets = pairs: val/loss is the pair-weighted mean of the per-batch joint loss
        return LossOutput(loss=loss, n_targets=n_pairs, extras=extras)
