"""Fine-tuning tasks (registry kind "task"): lm, classification, instruction, extractive_qa,
summarization. See base.py for the contract.

    task = build_task(cfg.task, tokenizer, model_cfg, cfg.data)
    model, task, loaded = load_task_model("outputs/finetune/DATE/TIME")   # evaluate / export
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmtrain.config.schema import DataConfig, LoraConfig, ModelConfig, TaskConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.tasks import classification, instruction, lm, qa, summarization  # noqa: F401  (registers)
from llmtrain.tasks.base import Task
from llmtrain.tasks.chat_template import encode_chat, format_chat, render_prompt, stop_strings

__all__ = ["Task", "build_task", "load_task_model", "task_meta", "format_chat", "encode_chat",
           "render_prompt", "stop_strings"]


def build_task(cfg: TaskConfig, tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig,
               state: dict | None = None, *, seed: int = 0, splits: TokenSplits | None = None) -> Task:
    """The registered task `cfg.name`, bound to its data: `seed` of its training batches, and for
    task lm the token splits of data.path (read on first use when not given)."""
    from llmtrain.registry import get

    bound = {"splits": splits} if splits is not None else {}  # only task lm trains on token splits
    return get("task", cfg.name)(cfg, tokenizer, model_cfg, data_cfg, state, seed, **bound)


def task_meta(task: Task) -> dict[str, Any]:
    """What a checkpoint stores in meta["task"] so load_task_model can rebuild the task."""
    return {"config": dataclasses.asdict(task.cfg), "state": task.state()}


def _fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in (d or {}).items() if k in names}


def load_task_model(checkpoint_path: str, device: torch.device | str | None = None, merge: bool = True):
    """A checkpoint written by finetune (or pretrain: task lm) -> (model, task, loaded).

    The model is backbone + head with the checkpoint's weights, LoRA adapters merged (merge=False
    keeps unmerged adapters of an intermediate checkpoint as LoRALinear modules); `loaded` is
    llmtrain.stages.common.LoadedCheckpoint (path, model = the same task model, model_cfg,
    tokenizer, meta)."""
    from llmtrain.models import build_model
    from llmtrain.models.lora import apply_lora, merge_lora
    from llmtrain.stages.common import LoadedCheckpoint, read_checkpoint
    from llmtrain.train import checkpoint as ckpt

    path, meta, model_cfg, tokenizer = read_checkpoint(checkpoint_path)
    run_cfg = meta.get("config") or {}
    data_cfg = DataConfig(**_fields(DataConfig, run_cfg.get("data", {})))
    task_info = meta.get("task") or {"config": {"name": "lm"}, "state": {}}
    task = build_task(TaskConfig(**_fields(TaskConfig, task_info.get("config", {}))), tokenizer, model_cfg,
                      data_cfg, task_info.get("state"))
    model = task.build_model(build_model(model_cfg))
    lora = meta.get("lora")
    if lora and not lora.get("merged", False):
        apply_lora(model, LoraConfig(**_fields(LoraConfig, lora)))
    ckpt.load_model_state(model, ckpt.load_weights(path), path)
    if merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    if device is not None:
        model.to(device)
    model.eval()
    return model, task, LoadedCheckpoint(path=path, model=model, model_cfg=model_cfg, tokenizer=tokenizer,
                                         meta=meta)
