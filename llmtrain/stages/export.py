"""export: write a checkpoint (checkpoint=PATH, or hf:DIR) to export.out=DIR in Hugging Face format.

Fine-tuned checkpoints are rebuilt through their task (LoRA adapters merged); a classification,
span (QA) or reward head becomes the matching transformers class where one computes the same
thing (a GPT-2/LLaMA reward model: *ForSequenceClassification with num_labels=1).
"""

from __future__ import annotations

import torch

from llmtrain import checkpoints
from llmtrain.checkpoints import Loaded
from llmtrain.compress.layout import compression_of
from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.threads import apply_threads

FORMATS = ("hf",)


def labels_of(loaded: Loaded) -> list[str] | None:
    """Class names for config.json's id2label (classification checkpoints), else None."""
    if loaded.task is None or not hasattr(loaded.model, "backbone"):
        return None
    try:
        return getattr(loaded.task, "labels", None)
    except UserError:  # not stored and its training data is gone: plain LABEL_i names
        return None


def run(cfg: RunConfig) -> None:
    apply_threads(cfg.trainer.threads)  # export runs without setup_runtime
    if not cfg.checkpoint:
        raise UserError("export needs checkpoint=PATH (a checkpoint or run directory)")
    if not cfg.export.out:
        raise UserError("export needs export.out=DIR (the directory to write)")
    if cfg.export.format not in FORMATS:
        raise UserError(f"export.format={cfg.export.format!r} is not supported (choose from: {', '.join(FORMATS)})")
    from llmtrain.hf.export import export_hf

    loaded = checkpoints.load(cfg.checkpoint, torch.device("cpu"))
    quantized = compression_of(loaded.meta).get("quant")
    if quantized:
        raise UserError(
            f"checkpoint {loaded.path} is quantized ({quantized['method']}): transformers has no loader for "
            "llmtrain's packed int layers, so there is no matching format; export its source "
            f"({compression_of(loaded.meta).get('source')}) and quantize on the transformers side"
        )
    model = loaded.model
    out = export_hf(loaded, cfg.export.out, model=model, labels=labels_of(loaded))
    n = sum(p.numel() for p in model.parameters())
    print(
        f"export: {type(model).__name__} ({loaded.model_cfg.name}, {n / 1e6:.2f}M params, vocab "
        f"{loaded.model_cfg.vocab_size}, tokenizer {loaded.tokenizer.name} with {loaded.tokenizer.vocab_size} "
        f"tokens) -> {out}",
        flush=True,
    )
