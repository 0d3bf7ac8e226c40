"""A token split stored as several memory-mapped shards, read as one array.

The loaders (data/loader.py) and objectives only take len() and slices of a split, so they work
unchanged on a ShardedTokens: a slice reads just the shards it touches and returns a numpy array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def open_shard(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


class ShardedTokens:
    """len(), integer indexing and slicing (step 1) over shards in order, as numpy arrays."""

    def __init__(self, shards: Sequence[np.ndarray]):
        self.shards = list(shards)
        self.dtype = self.shards[0].dtype if self.shards else np.dtype(np.uint16)
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)
        self.starts = self.ends - np.array([len(s) for s in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.zeros(0, dtype=self.dtype)
            first = int(np.searchsorted(self.ends, start, side="right"))
            last = int(np.searchsorted(self.ends, stop - 1, side="right"))
            parts = [
                self.shards[i][max(start - self.starts[i], 0) : min(stop, self.ends[i]) - self.starts[i]]
                for i in range(first, last + 1)
            ]
            return np.asarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {key} out of range for {n} tokens")
        s = int(np.searchsorted(self.ends, i, side="right"))
        return self.shards[s][i - self.starts[s]]

    def __array__(self, dtype=None, copy=None):  # the whole split: only for small ones
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()
