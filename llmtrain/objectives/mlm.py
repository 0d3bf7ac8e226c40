"""Masked language modelling (BERT): predict randomly chosen tokens from both sides.

Each sequence is `[CLS] window [SEP]`. Of its non-special tokens, `mask_prob` (15%) are
selected; a selected token becomes [MASK] 80% of the time, a random non-special token 10% and
stays itself 10%, and the loss is over the selected positions only (labels -100 elsewhere).
Masks are drawn from a generator keyed by (seed, step, rank), like the windows themselves, so a
window seen again gets fresh masks (RoBERTa's dynamic masking) and a resumed run sees exactly
the batches the uninterrupted run would have.
"""

from __future__ import annotations

import torch

from llmtrain.data.loader import sequential_windows, step_generator
from llmtrain.data.mixture import train_windows
from llmtrain.errors import UserError
from llmtrain.objectives.base import LossOutput, Objective
from llmtrain.objectives.chunked_ce import head_cross_entropy
from llmtrain.registry import register
from llmtrain.tokenizers import Tokenizer

# Independent random streams for train and validation masks (and for the windows' own RNG).
TRAIN_MASK_KEY, VAL_MASK_KEY = 0x4D4C4D, 0x4D4C56


class Masker:
    """BERT's 80/10/10 masking of the non-special tokens of a batch."""

    def __init__(self, tokenizer: Tokenizer, mask_prob: float):
        if not 0.0 < mask_prob <= 1.0:
            raise UserError(f"objective.mask_prob must be in (0, 1], got {mask_prob}")
        self.mask_prob, self.mask_id = mask_prob, tokenizer.mask_id
        self.special = torch.tensor(tokenizer.special_ids, dtype=torch.long)
        ids = torch.arange(tokenizer.vocab_size)
        # Random replacements come from the tokenizer's real vocabulary (the model's may be padded).
        self.replacements = ids[~torch.isin(ids, self.special)]

    def __call__(self, input_ids: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids, labels): labels hold the original token where selected, else -100."""
        shape = input_ids.shape
        selected = (torch.rand(shape, generator=g) < self.mask_prob) & ~torch.isin(input_ids, self.special)
        action = torch.rand(shape, generator=g)
        random_tokens = self.replacements[torch.randint(len(self.replacements), shape, generator=g)]
        out = torch.where(selected & (action < 0.8), self.mask_id, input_ids)
        out = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, out)
        labels = torch.where(selected, input_ids, -100)
        return out, labels

    def apply(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        """Mask batch["input_ids"] in place of the batch; add "labels" and "mlm_positions" (the
        flat indices of the selected tokens, found here on the host so the device never waits)."""
        batch["input_ids"], batch["labels"] = self(batch["input_ids"], g)
        batch["mlm_positions"] = (batch["labels"].reshape(-1) != -100).nonzero().squeeze(1)
        return batch


def frame(
    firsts: list[torch.Tensor], seconds: list[torch.Tensor] | None, seq_len: int, tok: Tokenizer
) -> dict[str, torch.Tensor]:
    """[CLS] A [SEP] (B [SEP]) per row, padded to seq_len.

    token_type_ids are 0 for [CLS] A [SEP] and 1 for B [SEP]; attention_mask is 0 on padding.
    """
    B = len(firsts)
    ids = torch.full((B, seq_len), tok.pad_id, dtype=torch.long)
    types = torch.zeros((B, seq_len), dtype=torch.long)
    attn = torch.zeros((B, seq_len), dtype=torch.long)
    cls, sep = torch.tensor([tok.cls_id]), torch.tensor([tok.sep_id])
    for r in range(B):
        parts = [cls, firsts[r], sep]
        if seconds is not None:
            parts += [seconds[r], sep]
        row = torch.cat(parts)
        n = len(row)
        assert n <= seq_len, (n, seq_len)
        ids[r, :n] = row
        attn[r, :n] = 1
        if seconds is not None:
            types[r, len(firsts[r]) + 2 : n] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": attn}


def check_seq_len(seq_len: int, specials: int) -> None:
    if seq_len < specials + 2:
        raise UserError(
            f"data.seq_len={seq_len} is too short: needs {specials} special tokens and at least 2 text tokens"
        )


def masked_lm_terms(model, hidden: torch.Tensor, batch: dict[str, torch.Tensor], chunked: bool = False):
    """(sum of cross-entropy, correct predictions, number of targets) over the selected tokens.

    Only the selected positions (batch["mlm_positions"], from Masker.apply) go through the MLM
    head: the vocabulary projection of every position would otherwise be most of a small
    model's step, for the ~85% of positions that have no target.
    """
    pos = batch["mlm_positions"]
    target = batch["labels"].reshape(-1).index_select(0, pos)
    features, head = model.lm_head_parts(hidden.reshape(-1, hidden.size(-1)).index_select(0, pos))
    ce, correct, _ = head_cross_entropy(features, head, target, chunked)
    return ce, correct, torch.full((), pos.numel(), device=pos.device)


def keep_params_in_graph(model, hidden: torch.Tensor, loss: torch.Tensor, head: str) -> torch.Tensor:
    """Add 0 * (the unused head's output): DDP (without find_unused_parameters) needs every
    parameter to receive a gradient, and mlm leaves the NSP head unused (nsp the MLM head)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss
    out = model.nsp_logits(hidden) if head == "nsp" else model.lm_logits(hidden[:, :1])
    return loss + 0.0 * out.float().sum()


class MaskedWindows:
    """Training batches: epoch-shuffled corpus windows as [CLS] window [SEP], freshly masked."""

    def __init__(
        self,
        tokens,
        seq_len: int,
        batch_size: int,
        tok: Tokenizer,
        masker: Masker,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_seq_len(seq_len, 2)
        # PackedWindows yields T+1 consecutive tokens per row (input + shifted label); with
        # T = seq_len - 3 that is exactly the seq_len - 2 tokens between [CLS] and [SEP].
        self.windows = train_windows(tokens, seq_len - 3, batch_size, seed, rank, world_size)
        self.seq_len, self.tok, self.masker = seq_len, tok, masker
        self.seed, self.rank = seed, rank

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        w = self.windows.batch(step)
        body = torch.cat([w["input_ids"], w["labels"][:, -1:]], dim=1)
        batch = frame(list(body), None, self.seq_len, self.tok)
        g = step_generator(self.seed, TRAIN_MASK_KEY, step, self.rank)
        return self.masker.apply(batch, g)


@register("objective", "mlm")
class MaskedLM(Objective):
    name = "mlm"
    needs_decoder = False
    supports_mixture = True

    def __init__(self, cfg, tokenizer, splits, data_cfg, seed):
        super().__init__(cfg, tokenizer, splits, data_cfg, seed)
        self.masker = Masker(tokenizer, cfg.mask_prob)

    def train_source(self, rank=0, world=1):
        return MaskedWindows(
            self.splits.train,
            self.data_cfg.seq_len,
            self.data_cfg.batch_size,
            self.tokenizer,
            self.masker,
            self.seed,
            rank,
            world,
        )

    def val_batches(self, max_batches=0, rank=0, world=1):
        """The validation split once, in order, with masks fixed by (seed, batch index)."""
        data = self.data_cfg
        check_seq_len(data.seq_len, 2)
        windows = sequential_windows(self.splits.val, data.seq_len - 2, data.batch_size, max_batches, rank, world)
        for i, w in enumerate(windows):
            lengths = (w["labels"] != -100).sum(1).tolist()  # real tokens per (padded) window
            bodies = [row[:n] for row, n in zip(w["input_ids"], lengths)]
            batch = frame(bodies, None, data.seq_len, self.tokenizer)
            # Keyed by the global batch index, so the masks do not depend on the world size.
            g = step_generator(self.seed, VAL_MASK_KEY, rank + i * world)
            yield self.masker.apply(batch, g)

    def loss(self, model, batch):
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        ce, correct, n = masked_lm_terms(model, hidden, batch, self.chunked_loss)
        loss = keep_params_in_graph(model, hidden, ce / n.clamp(min=1), "nsp")
        return LossOutput(loss=loss, n_targets=n, extras={"mlm_accuracy": (correct.detach(), n)})
