"""Fine-tuning tasks (registry kind "task"): lm, classification, instruction, extractive_qa,
summarization, reward, preference. See base.py for the contract.

    task = build_task(cfg.task, tokenizer, model_cfg, cfg.data)
    llmtrain.checkpoints.load(path).task      # a fine-tuned checkpoint's task, rebuilt
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmtrain.config.schema import DataConfig, ModelConfig, TaskConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.tasks import classification, instruction, lm, preference, qa, reward, summarization  # noqa: F401  (registers)
from llmtrain.tasks.base import Task
from llmtrain.tasks.chat_template import encode_chat, format_chat, render_prompt, stop_strings

__all__ = ["Task", "build_task", "task_meta", "format_chat", "encode_chat", "render_prompt", "stop_strings"]


def build_task(
    cfg: TaskConfig,
    tokenizer,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    state: dict | None = None,
    *,
    seed: int = 0,
    splits: TokenSplits | None = None,
) -> Task:
    """The registered task `cfg.name`, bound to its data: `seed` of its training batches, and for
    task lm the token splits of data.path (read on first use when not given)."""
    from llmtrain.registry import get

    bound = {"splits": splits} if splits is not None else {}  # only task lm trains on token splits
    return get("task", cfg.name)(cfg, tokenizer, model_cfg, data_cfg, state, seed, **bound)


def task_meta(task: Task) -> dict[str, Any]:
    """What a checkpoint stores in meta["task"] so llmtrain.checkpoints can rebuild the task."""
    return {"config": dataclasses.asdict(task.cfg), "state": task.state()}
