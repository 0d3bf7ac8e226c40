"""export: write a checkpoint (checkpoint=PATH, or hf:DIR) to export.out=DIR in Hugging Face format.

Fine-tuned checkpoints are rebuilt through their task (LoRA adapters merged); a classification
or span (QA) head becomes the matching transformers class where one computes the same thing.
"""
from __future__ import annotations

import torch

from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.hf import HF_PREFIX
from llmtrain.stages.common import load_checkpoint
from llmtrain.train import checkpoint as ckpt

FORMATS = ("hf",)


def load_for_export(path: str):
    """(loaded, model, labels): a task checkpoint comes back as its task model."""
    if not path.startswith(HF_PREFIX):
        meta = ckpt.load_meta(ckpt.resolve_checkpoint(path))
        if meta.get("task") or meta.get("lora"):
            try:
                from llmtrain.tasks import load_task_model
            except ImportError:
                raise UserError(f"checkpoint {path} was fine-tuned on a task; exporting it needs "
                                "llmtrain.tasks, which is not available") from None
            model, task, loaded = load_task_model(path, torch.device("cpu"))
            try:  # class names for config.json's id2label (classification tasks)
                labels = getattr(task, "labels", None) if hasattr(model, "backbone") else None
            except UserError:  # not stored and its training data is gone: plain LABEL_i names
                labels = None
            return loaded, model, labels
    loaded = load_checkpoint(path)
    return loaded, loaded.model, None


def run(cfg: RunConfig) -> None:
    if not cfg.checkpoint:
        raise UserError("export needs checkpoint=PATH (a checkpoint or run directory)")
    if not cfg.export.out:
        raise UserError("export needs export.out=DIR (the directory to write)")
    if cfg.export.format not in FORMATS:
        raise UserError(f"export.format={cfg.export.format!r} is not supported (choose from: {', '.join(FORMATS)})")
    from llmtrain.hf.export import export_hf

    loaded, model, labels = load_for_export(cfg.checkpoint)
    out = export_hf(loaded, cfg.export.out, model=model, labels=labels)
    n = sum(p.numel() for p in model.parameters())
    print(f"export: {type(model).__name__} ({loaded.model_cfg.name}, {n / 1e6:.2f}M params, vocab "
          f"{loaded.model_cfg.vocab_size}, tokenizer {loaded.tokenizer.name} with {loaded.tokenizer.vocab_size} "
          f"tokens) -> {out}", flush=True)
