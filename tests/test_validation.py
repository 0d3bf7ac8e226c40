"""The shared validation pass (llmtrain/data/validation.py) and the trainer's one contract."""

from __future__ import annotations

import pytest
import torch

from llmtrain import registry
from llmtrain.data.validation import shard, sum_losses
from llmtrain.distributed import gather_indexed
from llmtrain.objectives import LossOutput, Objective, Trainee
from llmtrain.tasks import Task


@pytest.mark.parametrize("max_batches", [0, 3])
def test_shards_cover_the_capped_batches_once_whatever_the_world_size(max_batches):
    items = list(range(23))
    single = shard(items, 5, max_batches)
    assert [b for b, _ in single] == list(range(3 if max_batches else 5))
    assert [x for _, chunk in single for x in chunk] == items[: 15 if max_batches else 23]
    for world in (2, 3, 7):
        parts = [shard(items, 5, max_batches, rank, world) for rank in range(world)]
        for rank, part in enumerate(parts):
            assert all(b % world == rank for b, _ in part)
        # Each batch is the one a single process scores, and every batch is scored by one rank.
        assert sorted((b, list(c)) for part in parts for b, c in part) == [(b, list(c)) for b, c in single]


def test_sum_losses_is_the_exact_float64_sum_and_weight_zero_counts_nothing():
    torch.manual_seed(0)
    batches = [{"x": torch.randn(n)} for n in (3, 5, 1, 4)]

    def loss(batch):
        x = batch["x"]
        n = torch.tensor(x.numel())
        return LossOutput(x.mean(), n, {"pos": ((x > 0).sum(), n)})

    sums = sum_losses(loss, batches, torch.device("cpu"))
    total = sum(float(b["x"].mean()) * b["x"].numel() for b in batches)
    count = sum(b["x"].numel() for b in batches)
    assert sums.total.dtype == torch.float64 and float(sums.total) == total and float(sums.count) == count
    assert sums.mean_loss() == total / count
    assert sums.extra_means() == {"pos": sum(int((b["x"] > 0).sum()) for b in batches) / count}
    padded = sum_losses(loss, batches + batches[:2], torch.device("cpu"), weights=[1.0] * 4 + [0.0, 0.0])
    assert float(padded.total) == total and float(padded.count) == count
    assert sums.all_reduce() is sums and float(sums.total) == total  # one process: nothing to sum


def test_gather_indexed_orders_by_index_and_refuses_overlaps():
    assert gather_indexed([(2, "c"), (0, "a"), (1, "b")]) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="overlap"):
        gather_indexed([(0, "a"), (0, "a")])


@pytest.mark.parametrize("kind, base", [("objective", Objective), ("task", Task)])
def test_objectives_and_tasks_share_the_trainee_contract(kind, base):
    for name in registry.names(kind):
        cls = registry.get(kind, name)
        assert issubclass(cls, base) and Trainee in cls.__mro__, name
        assert cls.needs_decoder in (True, False, None), name
