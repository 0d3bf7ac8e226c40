"""The one checkpoint loader every stage uses.

    loaded = load(path, device)     # -> Loaded(path, model, model_cfg, tokenizer, meta, task)
    info = read(path)               # the same without weights (meta, model config, tokenizer)

`path` may be
- a run directory (its newest complete checkpoint), a `checkpoints/step_N` directory, or a file
  inside one (model.safetensors, meta.json);
- a run directory's `best_checkpoint` pointer file (the checkpoint it names);
- `hf:DIR` (or a cached Hub id): a transformers GPT-2 / LLaMA / BERT directory;
- a fine-tuned checkpoint: the model comes back as its task model (backbone + head) and
  `task` is the task rebuilt from meta["task"];
- a quantized or pruned checkpoint (llmtrain/compress/): quantized layers and pruning masks are
  put back before the weights load;
- a LoRA run: the final checkpoint holds merged weights; an intermediate one holds the base
  weights plus unmerged adapters, which are applied and merged (merge=False keeps them as
  LoRALinear modules).

The on-disk format (save, list, resolve, verify) is llmtrain/train/checkpoint.py; this module
turns a checkpoint into objects, after checking the weights against the sha256 in meta.json.
What a new checkpoint records is `checkpoint_meta`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtrain.config.moved_keys import known_fields  # older checkpoints: removed keys, `options` dicts
from llmtrain.config.schema import DataConfig, LoraConfig, ModelConfig, RunConfig, TaskConfig
from llmtrain.errors import UserError
from llmtrain.hf import HF_PREFIX
from llmtrain.run_records import config_dict
from llmtrain.tokenizers import Tokenizer, tokenizer_from_state
from llmtrain.train import checkpoint as ckpt


@dataclass
class Info:
    """What a checkpoint is, without its weights."""

    path: Path
    meta: dict[str, Any]
    model_cfg: ModelConfig
    tokenizer: Tokenizer

    @property
    def is_task(self) -> bool:
        return bool(self.meta.get("task"))


@dataclass
class Loaded(Info):
    """A checkpoint with its weights: `model` is the task model for fine-tuned checkpoints."""

    model: torch.nn.Module = None  # type: ignore[assignment]
    task: Any = None  # llmtrain.tasks.Task, or None for pretraining checkpoints and hf: dirs

    @property
    def backbone(self) -> torch.nn.Module:
        return getattr(self.model, "backbone", self.model)


def is_hf(path: str | Path) -> bool:
    return str(path).startswith(HF_PREFIX)


def read(path: str | Path) -> Info:
    """A checkpoint (any form above) -> its directory, metadata, model config and tokenizer."""
    if is_hf(path):
        from llmtrain.hf.load import hf_info

        return hf_info(str(path))
    ck = ckpt.resolve_checkpoint(path)
    meta = ckpt.load_meta(ck)
    try:
        model_cfg = ModelConfig(**known_fields(ModelConfig, meta["model"]))
        tokenizer = tokenizer_from_state(meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata {ck / ckpt.META} is incomplete or foreign: {e}") from None
    return Info(path=ck, meta=meta, model_cfg=model_cfg, tokenizer=tokenizer)


def load(path: str | Path, device: torch.device | str | None = None, *, merge: bool = True) -> Loaded:
    """A checkpoint (any form above) -> the model with its weights, in eval mode, on `device`."""
    if is_hf(path):
        from llmtrain.hf.load import load_hf

        loaded = load_hf(str(path))
    else:
        info = read(path)
        model, task = _build(info, merge)
        loaded = Loaded(**vars(info), model=model, task=task)
    loaded.model.eval()
    if device is not None:
        loaded.model.to(device)
    return loaded


def _build(info: Info, merge: bool):
    """The model (task model for fine-tuned checkpoints) with the checkpoint's weights, and the task."""
    from llmtrain.compress.layout import restore_layout
    from llmtrain.models import build_model
    from llmtrain.models.lora import apply_lora, merge_lora

    ckpt.verify(info.path, [ckpt.WEIGHTS], info.meta)  # only the file read here: a bad train_state.pt is resume's
    weights = ckpt.load_weights(info.path)
    if not info.is_task:
        model = build_model(info.model_cfg)
        restore_layout(model, info.meta, weights)  # quantized layers, pruning masks
        ckpt.load_model_state(model, weights, info.path)
        return model, None
    task = task_of(info)
    model = task.build_model(build_model(info.model_cfg))
    lora = info.meta.get("lora")
    if lora and not lora.get("merged", False):  # an intermediate checkpoint of a LoRA run
        apply_lora(model, LoraConfig(**known_fields(LoraConfig, lora)))
    restore_layout(model, info.meta, weights)
    ckpt.load_model_state(model, weights, info.path)
    if merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, task


def task_of(info: Info, **overrides: Any):
    """The fine-tuning task a checkpoint was trained on, rebuilt from meta["task"] (with its
    state, e.g. label names); `overrides` replace task config fields (e.g. val_path)."""
    from llmtrain.tasks import build_task

    run_cfg = info.meta.get("config") or {}
    data_cfg = DataConfig(**known_fields(DataConfig, run_cfg.get("data", {})))
    task_info = info.meta.get("task") or {"config": {"name": "lm"}, "state": {}}
    task_cfg = TaskConfig(**known_fields(TaskConfig, task_info.get("config", {})))
    if overrides:
        task_cfg = dataclasses.replace(task_cfg, **overrides)
    return build_task(task_cfg, info.tokenizer, info.model_cfg, data_cfg, task_info.get("state"))


def checkpoint_meta(cfg: RunConfig, model_cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """What every new checkpoint records besides its weights (see llmtrain/train/checkpoint.py)."""
    return {
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer.state(),
        "objective": cfg.objective.name,
        "stage": cfg.stage,
        "config": config_dict(cfg),
    }
