"""The validation pass, one for every caller (the trainer, `llmtrain evaluate`, a task's loss
before training): which batches a rank scores, and the loss summed over them. It sits with the
data (layer 3 of docs/design.md) so the loaders, objectives and tasks below the trainer use it.

Sharding: the items are cut into batches in order *before* sharding, capped at max_batches,
and rank r of W takes batches r, r + W, r + 2W, ... Every batch is then the same whatever the
world size, so the numbers match a single process, and no example is scored twice (training
samplers pad the last shard with repeats, which a metric would count twice).

Sums: loss * n_targets, n_targets and each extra's (sum, count) are accumulated in float64 on
the device (no host sync per batch), so the mean over the whole set is exact for any batching
and any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch

from llmtrain.distributed import all_reduce_sum

T = TypeVar("T")


def shard(
    items: Sequence[T], batch_size: int, max_batches: int = 0, rank: int = 0, world: int = 1
) -> list[tuple[int, Sequence[T]]]:
    """This rank's (batch index, batch) pairs: `items` cut into batch_size chunks in order, the
    first max_batches of them (0: all), and of those every world-th from the rank's own."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), max(1, batch_size))]
    if max_batches > 0:
        chunks = chunks[:max_batches]
    return [(b, chunks[b]) for b in range(rank, len(chunks), world)]


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class LossSums:
    """Float64 sums over the scored batches, on the device."""

    total: torch.Tensor  # sum of loss * n_targets (each loss is a mean over its n_targets)
    count: torch.Tensor  # sum of n_targets
    extras: dict[str, torch.Tensor]  # name -> [sum, count]

    def all_reduce(self) -> LossSums:
        """Summed over ranks, in place (collective: every rank calls it)."""
        all_reduce_sum(self.total), all_reduce_sum(self.count)
        for acc in self.extras.values():
            all_reduce_sum(acc)
        return self

    def mean_loss(self) -> float:
        """The loss over every target (0.0 when there were none)."""
        return float(self.total) / max(float(self.count), 1.0)

    def extra_means(self) -> dict[str, float]:
        out = {}
        for k, acc in self.extras.items():
            s, c = acc.tolist()
            out[k] = s / max(c, 1.0)
        return out


@torch.no_grad()
def sum_losses(
    loss_fn: Callable[[dict[str, torch.Tensor]], Any],
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    weights: Sequence[float] | None = None,
) -> LossSums:
    """LossSums of loss_fn (batch -> llmtrain.objectives.LossOutput; it applies any autocast)
    over `batches`, each moved to `device`.

    `weights` (default 1 each) scale each batch's terms: the trainer under FSDP pads a rank's
    batches with weight-0 forwards, since every forward is a collective there."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    extras: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        weight = 1.0 if weights is None else weights[i]
        out = loss_fn(move(batch, device))
        total += out.loss.double() * out.n_targets * weight
        count += out.n_targets.double() * weight
        for k, (s, c) in out.extras.items():
            acc = extras.setdefault(k, torch.zeros(2, dtype=torch.float64, device=device))
            acc += torch.stack([s.double(), c.double()]) * weight
    return LossSums(total, count, extras)
