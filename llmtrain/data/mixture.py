"""Weighted data mixtures (data.sources): each source split, prepared and validated on its own,
training windows drawn from the sources by weight as a pure function of (seed, step, rank).

The draw is blocked stratified sampling rather than an independent coin per window: the global
window sequence (all ranks' windows in order, as PackedWindows numbers them) is cut into blocks
of M windows; source i gets C_i((b+1)M) - C_i(bM) windows of block b, where

    C_i(n) = floor(n * P_i) - floor(n * P_{i-1})      (P_i: cumulative share of sources <= i)

sums to n and stays within 2 windows of n * share_i, and the block's windows are shuffled by a
generator keyed by (seed, block). So the fractions hold to a few windows at any length (a coin per
window drifts by sqrt(n)), the order within a block is random, and window number g is found in
O(1) from g alone: resuming at any step needs no state. Each source's windows are read from its
own epoch-shuffled sequence (PackedWindows.window_start), the k-th drawn getting number k, so a
source's tokens are still seen once per epoch of that source.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.data.corpus import TokenSplits
from llmtrain.data.loader import PackedWindows, step_generator, window_batch
from llmtrain.errors import UserError

# Windows per block: at least this many, and enough that every source gets >= 4 per block (so
# the block quotas above are never negative, with margin for float rounding).
MIN_BLOCK = 256
# A smaller share would need blocks of more than 400k windows; such a source is refused.
MIN_SHARE = 1e-5
MIX_KEY = 0x313C  # the generator stream of the block shuffles
SOURCE_SEED_KEY = 0x5EED  # each source's own window order
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_GENERIC = {"train", "valid", "validation", "val", "test", "input", "data", "text", "corpus", "all"}
_SUFFIXES = {".gz", ".txt", ".text", ".jsonl", ".json", ".csv", ".tsv", ".parquet"}


# ------------------------------------------------------------------------------ config
def default_name(path: str) -> str:
    """A metric-safe name for a source: the file's stem (tinyshakespeare.txt.gz -> tinyshakespeare),
    its folder's for a split-like stem (wikitext2/valid.txt -> wikitext2), a directory's or glob's
    folder, a hub dataset's last name component."""
    if path.startswith("hf:"):
        stem = path[3:].split("@")[0].split(":")[0].rstrip("/").split("/")[-1]
    elif any(c in path for c in "*?["):
        prefix = re.split(r"[*?\[]", path, maxsplit=1)[0]
        stem = Path(prefix).name if prefix.endswith("/") else Path(prefix).parent.name
    else:
        p = Path(path)
        stem = p.name
        while Path(stem).suffix.lower() in _SUFFIXES:
            stem = Path(stem).stem
        if stem.lower() in _GENERIC and p.parent.name:  # wikitext2/valid.txt -> wikitext2
            stem = p.parent.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.") or "source"


def source_names(sources: list[Any]) -> list[str]:
    """Each source's name: its own `name`, else from its path; two defaults that collide get their
    parent folder in front (wikitext2_train). Refused: a bad or repeated name."""
    first = [s.name or default_name(s.path) for s in sources]
    names = list(first)
    for i, s in enumerate(sources):
        if not s.name and first.count(first[i]) > 1 and not s.path.startswith("hf:"):
            parent = default_name(str(Path(s.path).expanduser().resolve().parent))
            names[i] = f"{parent}_{names[i]}"
    for i, name in enumerate(names):
        if not NAME_RE.match(name):
            raise UserError(f"data.sources[{i}].name {name!r}: use letters, digits, '_', '-' or '.' (it names metrics)")
        if names.count(name) > 1:
            raise UserError(f"data.sources[{i}]: two sources are named {name!r}; give each a different name")
    return names


def check_sources(cfg: Any, objective_cls: type) -> None:
    """data.sources' problems as one line each, before any work (config validation)."""
    d = cfg.data
    if d.sources is None:
        return
    if cfg.stage != "pretrain":
        raise UserError(f"data.sources is for pretrain; {cfg.stage} reads one source (data.path)")
    if d.path:
        raise UserError(
            f"data.path ({d.path}) and data.sources are both set; a mixture names every source in "
            "data.sources (use data=mixture, which sets no data.path)"
        )
    if not d.sources:
        raise UserError("data.sources is empty; give at least one {path, weight}")
    if d.val_path:
        raise UserError(
            "data.val_path does not combine with data.sources: each source validates on its last data.val_fraction"
        )
    if not getattr(objective_cls, "supports_mixture", False):
        raise UserError(
            f"data.sources: objective={cfg.objective.name} does not train on a mixture "
            "(clm, mlm, span_corruption and denoising do)"
        )
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not s.path:
            raise UserError(f"{key}.path is missing: each source is {{path, weight}}")
        if not (math.isfinite(s.weight) and s.weight > 0):
            why = "a source of weight 0 is never drawn; leave it out" if s.weight == 0 else "weights are > 0"
            raise UserError(f"{key}.weight={s.weight:g} ({s.path}): {why}")
        if not s.path.startswith("hf:") and not _exists(s.path):
            raise UserError(f"{key}.path: no such file, directory or glob: {s.path}")
    total = sum(s.weight for s in d.sources)
    for i, s in enumerate(d.sources):
        if s.weight / total < MIN_SHARE:
            raise UserError(f"data.sources[{i}].weight={s.weight:g} is a share below {MIN_SHARE:g} of the mixture")
    source_names(d.sources)


def _exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return bool(glob.glob(path, recursive=True))
    return Path(path).expanduser().exists()


def source_data(data: Any, source: Any) -> Any:
    """The DataConfig of one source: the mixture's settings with the source's path (and its own
    text_field / doc_pattern where it sets them)."""
    own = {k: getattr(source, k) for k in ("text_field", "doc_pattern") if getattr(source, k, None) is not None}
    return dataclasses.replace(data, path=source.path, sources=None, **own)


# ------------------------------------------------------------------------------ splits
@dataclass
class MixedTokens:
    """The training side of a mixture: each source's token array, with its share."""

    names: list[str]
    parts: list[Any]  # array-likes: len() and slicing give numpy arrays (often memory-mapped)
    shares: np.ndarray  # sums to 1

    def __post_init__(self):
        self._schedules: dict[int, MixtureSchedule] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def schedule(self, seed: int) -> MixtureSchedule:
        if seed not in self._schedules:
            self._schedules[seed] = MixtureSchedule(self.shares, seed)
        return self._schedules[seed]


@dataclass
class MixtureSplits:
    """What an objective is given for data.sources: per-source TokenSplits, and `train` as one
    MixedTokens (objectives build their windows with `train_windows`, which draws by weight).
    There is no single `val`: each source validates on its own (Objective.val_sources)."""

    names: list[str]
    weights: list[float]
    parts: list[TokenSplits]

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=np.float64)
        self.train = MixedTokens(self.names, [p.train for p in self.parts], w / w.sum())
        self.n_docs = sum(p.n_docs for p in self.parts)
        self.unk = sum(p.unk for p in self.parts)
        self.by = "per source"

    def describe(self) -> str:
        shares = self.train.shares
        each = "; ".join(
            f"{n} {100 * s:.0f}%: {p.describe()}" for n, s, p in zip(self.names, shares, self.parts, strict=True)
        )
        return f"mixture of {len(self.parts)} sources ({each})"


def load_mixture(cfg: Any, tokenizer: Any = None) -> tuple[Any, MixtureSplits]:
    """The tokenizer and the per-source splits of data.sources. A tokenizer that must be trained
    is trained once on every source's training split together (in source order); then each
    source goes through the prepared-data cache like a data.path of its own."""
    from llmtrain.data.corpus import split_reader
    from llmtrain.data.pipeline import load_corpus, run_tokenizer
    from llmtrain.distributed import barrier, is_main

    sources = list(cfg.data.sources)
    names = source_names(sources)
    cfgs = [dataclasses.replace(cfg, data=source_data(cfg.data, s)) for s in sources]
    readers = [split_reader(c.data) for c in cfgs]
    if tokenizer is None:
        for main_turn in (True, False):  # rank 0 trains (and caches) it first
            if is_main() == main_turn:
                tokenizer = run_tokenizer(cfg, lambda: [doc for read in readers for doc in read().train])
            barrier()
    parts = []
    for name, c in zip(names, cfgs, strict=True):
        try:
            parts.append(load_corpus(c, tokenizer=tokenizer)[1])
        except UserError as e:
            raise UserError(f"data.sources {name}: {e}") from None
    return tokenizer, MixtureSplits(names, [s.weight for s in sources], parts)


# ---------------------------------------------------------------------------- sampling
class MixtureSchedule:
    """Which source global window number g comes from, and which of that source's windows it is
    (see the module docstring). Stateless but for a cache of the current block."""

    def __init__(self, shares: np.ndarray, seed: int):
        self.shares = np.asarray(shares, dtype=np.float64)
        self.seed = seed
        self.cum = np.cumsum(self.shares)
        self.cum[-1] = 1.0  # so that C sums to n exactly
        self.block = max(MIN_BLOCK, math.ceil(4.0 / float(self.shares.min())))
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def counts_at(self, n: int) -> np.ndarray:
        """C(n) at a block boundary n: windows of each source among the first n."""
        upper = np.floor(n * self.cum).astype(np.int64)
        return np.diff(upper, prepend=0)

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each window of block b, its number within that source)."""
        cached = self._cached  # one read: safe should a loader thread share the schedule
        if cached is None or cached[0] != b:
            M = self.block
            base = self.counts_at(b * M)
            quota = self.counts_at((b + 1) * M) - base
            assert (quota >= 0).all(), quota
            perm = torch.randperm(M, generator=step_generator(self.seed, MIX_KEY, b)).numpy()
            src = np.repeat(np.arange(len(quota)), quota)[perm]
            number = np.empty(M, dtype=np.int64)
            for i in range(len(quota)):
                where = np.flatnonzero(src == i)
                number[where] = base[i] + np.arange(len(where))
            cached = self._cached = (b, src, number)
        return cached[1], cached[2]

    def assign(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, per-source window number) of each global window number in g."""
        src = np.empty(len(g), dtype=np.int64)
        number = np.empty(len(g), dtype=np.int64)
        blocks, pos = np.divmod(np.asarray(g, dtype=np.int64), self.block)
        for b in np.unique(blocks):
            s, k = self._block(int(b))
            sel = blocks == b
            src[sel], number[sel] = s[pos[sel]], k[pos[sel]]
        return src, number

    def counts(self, n: int) -> np.ndarray:
        """Windows of each source among the first n global windows (any n)."""
        b, r = divmod(n, self.block)
        out = self.counts_at(b * self.block)
        if r:
            out = out + np.bincount(self._block(b)[0][:r], minlength=len(self.shares))
        return out


class MixtureWindows:
    """PackedWindows over a MixedTokens: the same global window numbering (so ranks read disjoint
    windows and batches are a function of the step), each window drawn from a source by weight."""

    def __init__(
        self, mixed: MixedTokens, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.schedule = mixed.schedule(seed)
        self.sources = []
        for i, (name, tokens) in enumerate(zip(mixed.names, mixed.parts, strict=True)):
            own_seed = int(np.random.SeedSequence([seed, SOURCE_SEED_KEY, i]).generate_state(1)[0])
            try:
                self.sources.append(PackedWindows(tokens, seq_len, batch_size, own_seed, rank, world_size))
            except ValueError as e:
                raise UserError(f"data.sources {name}: {e}") from None

    def assign(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, per-source window number) of this rank's windows at `step`."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return self.schedule.assign(np.arange(first, first + self.batch_size))

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        src, number = self.assign(step)
        # Each row read straight from its source's (memory-mapped) tokens, in the drawn order.
        rows = np.empty((len(src), self.seq_len + 1), dtype=np.int64)
        for r, (s, k) in enumerate(zip(src.tolist(), number.tolist())):
            windows = self.sources[s]
            start = windows.window_start(k)
            rows[r] = windows.tokens[start : start + self.seq_len + 1]
        return window_batch(rows)


def train_windows(tokens: Any, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """The training windows of an objective: PackedWindows over one token array, or MixtureWindows
    over a mixture's MixedTokens."""
    if isinstance(tokens, MixedTokens):
        return MixtureWindows(tokens, seq_len, batch_size, seed, rank, world_size)
    return PackedWindows(tokens, seq_len, batch_size, seed, rank, world_size)
