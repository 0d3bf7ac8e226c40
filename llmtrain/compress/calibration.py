"""The batches a checkpoint is calibrated on (pruning importance, QAT-free PTQ calibration):
its objective's training batches for a pretraining checkpoint (data=... or the data it was
trained on), its task's training batches for a fine-tuned one."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from llmtrain.config.moved_keys import known_fields
from llmtrain.config.schema import DataConfig, ObjectiveConfig, RunConfig
from llmtrain.errors import UserError


def trainee_of(loaded, cfg: RunConfig):
    """The Trainee (llmtrain.objectives / llmtrain.tasks) the checkpoint was trained with."""
    from llmtrain import checkpoints
    from llmtrain.data.pipeline import load_corpus
    from llmtrain.eval.suite import task_overrides
    from llmtrain.objectives import build_objective

    if loaded.task is not None:
        given = task_overrides(cfg.task)
        return checkpoints.task_of(loaded, **given) if given else loaded.task
    run_cfg = loaded.meta.get("config") or {}
    data = cfg.data if cfg.data.path else DataConfig(**known_fields(DataConfig, run_cfg.get("data") or {}))
    if not data.path:
        raise UserError(f"checkpoint {loaded.path}: no data to calibrate on; pass data=text data.path=FILE")
    data = dataclasses.replace(data, seq_len=min(data.seq_len, loaded.model_cfg.max_seq_len))
    _, splits = load_corpus(dataclasses.replace(cfg, data=data), tokenizer=loaded.tokenizer)
    ocfg = ObjectiveConfig(**known_fields(ObjectiveConfig, run_cfg.get("objective") or {}))
    ocfg = dataclasses.replace(ocfg, name=loaded.meta.get("objective") or ocfg.name)
    return build_objective(ocfg, loaded.tokenizer, splits, data, cfg.trainer.seed)


def forward_passes(model: torch.nn.Module, trainee, n_batches: int, device) -> Callable[[], None]:
    """A function that runs `model` over the first n_batches training batches (no gradients)."""

    def run() -> None:
        source = trainee.train_source()
        with torch.no_grad():
            for step in range(n_batches):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in source.batch(step).items()}
                trainee.loss(model, batch)

    return run
