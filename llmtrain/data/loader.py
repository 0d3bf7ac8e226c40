"""Batches as a pure function of (seed, step, rank).

A loader whose position is just the step number resumes exactly with nothing to save, and
ranks read disjoint windows by construction. The CLM source tiles the token stream into
non-overlapping windows of seq_len+1 tokens, reshuffled each epoch with a fresh random
offset, so every token is seen once per epoch and windows do not repeat between epochs.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from llmtrain.data.validation import shard


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A torch RNG determined by the seed and keys (e.g. step, rank)."""
    ss = np.random.SeedSequence([seed, *keys])
    return torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))


def min_train_tokens(seq_len: int) -> int:
    """The fewest tokens PackedWindows accepts: two windows of seq_len + 1 sharing one token,
    since one window is kept back for the epoch's random offset."""
    return 2 * seq_len + 1


class PackedWindows:
    """Random, epoch-shuffled, non-overlapping windows over a token array (CLM training)."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        # Kept as given (often a read-only np.memmap of a prepared split): each batch reads only
        # its own windows, so memory does not grow with the corpus or the number of steps.
        self.tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # One fewer window than fits, so every epoch offset in [0, seq_len) has the same count.
        self.n_windows = (len(self.tokens) - 1) // seq_len - 1
        if len(self.tokens) < min_train_tokens(seq_len):  # the same as n_windows < 1
            raise ValueError(f"corpus of {len(tokens)} tokens is too short for seq_len {seq_len}")
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            g = step_generator(self.seed, 0xE90C, epoch)
            offset = int(torch.randint(self.seq_len, (1,), generator=g))
            perm = torch.randperm(self.n_windows, generator=g).numpy()
            self._epoch_cache = (epoch, offset, perm)
        return self._epoch_cache[1], self._epoch_cache[2]

    def window_start(self, g: int) -> int:
        """Token offset of window number g of the epoch-shuffled sequence (all ranks' windows in
        order; a data mixture draws a source's windows by this number, llmtrain/data/mixture.py)."""
        epoch, idx = divmod(g, self.n_windows)
        offset, perm = self._epoch(epoch)
        return offset + int(perm[idx]) * self.seq_len

    def starts(self, step: int) -> np.ndarray:
        """Token offsets of the windows of this rank's batch at `step`."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return np.array([self.window_start(g) for g in range(first, first + self.batch_size)], dtype=np.int64)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.read(self.starts(step))

    def read(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """The windows at these token offsets as input_ids / labels rows."""
        # Only these windows are read from the (memory-mapped) array, widened to int64 in place.
        T = self.seq_len
        rows = np.empty((len(starts), T + 1), dtype=np.int64)
        for i, s in enumerate(starts):
            rows[i] = self.tokens[s : s + T + 1]
        return window_batch(rows)


def window_batch(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Training windows of seq_len + 1 tokens (int64 rows) as input_ids and next-token labels."""
    t = torch.from_numpy(rows)
    return {"input_ids": t[:, :-1], "labels": t[:, 1:]}


def sequential_windows(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Non-overlapping windows in order, covering the whole split once (evaluation).

    The final partial window is kept, so every token of the split is scored exactly once.
    """
    tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    starts = list(range(0, max(len(tokens) - 1, 0), seq_len))
    for _, chunk in shard(starts, batch_size, max_batches, rank, world_size):
        x = torch.full((len(chunk), seq_len), 0, dtype=torch.long)
        y = torch.full((len(chunk), seq_len), -100, dtype=torch.long)  # -100: ignored by the loss
        for r, s in enumerate(chunk):
            # Only this window is read (and widened to int64) from a memory-mapped split.
            w = torch.from_numpy(np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64))
            k = len(w) - 1
            x[r, :k] = w[:-1]
            y[r, :k] = w[1:]
        yield {"input_ids": x, "labels": y}
