"""data.streaming=true: train on a source tokenized on the fly, with no prepared copy of it.

For a corpus too big to copy locally (typically `hf:NAME`, read through the `datasets` streaming
mode, which never downloads it whole). The training stream is the source's documents in order,
each encoded and followed by eos, repeated epoch after epoch; window g is its tokens
[g * seq_len, g * seq_len + seq_len + 1). Batch `step` of rank r holds windows
(step * world + r) * batch_size + i, so the position is just the number of windows consumed:
resuming at a step re-reads the stream from its start and skips (re-tokenizing, not training)
to that window, which gives bit-exact batches at a cost that grows with the position. There is
no shuffling: the order is the source's. Validation is data.val_path, tokenized whole, or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from llmtrain.tokenizers import Tokenizer


@dataclass
class TokenStream:
    """The training side of a streamed source: what to read and how to encode it. It has no
    length (the corpus is never counted) and no random access; StreamWindows reads it in order."""

    data: Any  # DataConfig
    tokenizer: Tokenizer

    def chunks(self) -> Iterator[np.ndarray]:
        """One epoch of tokens, in pieces."""
        from llmtrain.data.corpus import encode_mode
        from llmtrain.data.prepare import encode_task, make_tasks
        from llmtrain.data.sources import iter_pieces

        d = self.data
        pieces = iter_pieces(d.path, d.text_field, d.encoding_errors, d.doc_pattern)
        for task, _ in make_tasks((("train", p, e) for p, e in pieces), encode_mode(self.tokenizer)):
            yield encode_task(task, self.tokenizer)


class StreamWindows:
    """Windows of seq_len + 1 tokens read in order from a TokenStream (see the module docstring)."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self._restart()

    def _restart(self) -> None:
        self._chunks = self._epochs()
        self._buf = np.zeros(0, dtype=np.int64)
        self._pos = 0  # stream position of _buf[0]

    def _epochs(self) -> Iterator[np.ndarray]:
        while True:
            empty = True
            for c in self.stream.chunks():
                empty = empty and not len(c)
                yield c
            if empty:
                raise ValueError("the streamed source holds no tokens")

    def window(self, g: int) -> np.ndarray:
        T = self.seq_len
        start = g * T
        if start < self._pos:  # behind the stream (e.g. an earlier step asked again): read it anew
            self._restart()
        while self._pos + len(self._buf) < start + T + 1:
            drop = min(max(start - self._pos, 0), len(self._buf))
            self._buf = np.concatenate([self._buf[drop:], next(self._chunks).astype(np.int64)])
            self._pos += drop
        lo = start - self._pos
        return self._buf[lo : lo + T + 1]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        B = self.batch_size
        first = (step * self.world_size + self.rank) * B
        rows = torch.from_numpy(np.stack([self.window(g) for g in range(first, first + B)]))
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
