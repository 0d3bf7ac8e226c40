"""What `llmtrain finetune` does with compressed models (called from llmtrain/stages/finetune.py):
refuse what cannot be trained, set up QAT (llmtrain/compress/qat.py), keep pruning masks at zero
(llmtrain/compress/prune.py `enforce`), carry the compression record on, and at the end of QAT
replace the final checkpoint by the really quantized one."""

from __future__ import annotations

import torch.nn as nn

from llmtrain.compress import prune
from llmtrain.compress.layout import compression_of
from llmtrain.compress.qat import QAT_METHODS, convert_qat, prepare_qat
from llmtrain.errors import UserError


def check_init(cfg, loaded) -> None:
    """Refuse what cannot be fine-tuned: a quantized checkpoint (no trainable weights), masks
    with LoRA, QAT with LoRA or FSDP, an unknown finetune.qat."""
    ft = cfg.finetune
    if "quant" in compression_of(loaded.meta):
        raise UserError(
            f"init_from={loaded.path} is quantized and has no trainable weights; fine-tune its source "
            f"({compression_of(loaded.meta).get('source')}), with finetune.qat=int8|int4 for quantization-aware "
            "training"
        )
    if ft.qat is not None:
        if ft.qat not in QAT_METHODS:
            raise UserError(f"finetune.qat={ft.qat!r} is not one of {', '.join(QAT_METHODS)} (or null)")
        if ft.lora.r > 0 or cfg.trainer.strategy == "fsdp":
            raise UserError("finetune.qat cannot be combined with finetune.lora.r > 0 or trainer.strategy=fsdp")
        if ft.qat == "int4" and ft.qat_group_size % 2:
            raise UserError(f"finetune.qat_group_size={ft.qat_group_size} must be even")
    if prune.masks_of(loaded.model) and ft.lora.r > 0:
        raise UserError(
            f"init_from={loaded.path} has pruning masks: recover it with full fine-tuning "
            "(LoRA's merged update cannot keep the pruned weights at zero)"
        )


def setup(cfg, model: nn.Module, loaded) -> str:
    """Before training: QAT layers; returns a note for the start-up line ('' if nothing)."""
    notes = []
    masks = prune.masks_of(model)
    if masks:
        notes.append(f"pruning masks on {len(masks)} layers kept at zero")
    if cfg.finetune.qat:
        names = prepare_qat(model, cfg.finetune.qat, cfg.finetune.qat_group_size)
        notes.append(f"QAT {cfg.finetune.qat} on {len(names)} linear layers")
    return "; ".join(notes)


def checkpoint_record(cfg, loaded) -> dict:
    """meta.json additions: the source's compression record carries on (the report compares
    with the original model); QAT is recorded while training."""
    rec = dict(compression_of(loaded.meta))
    if rec:
        rec["recovery_finetune_of"] = str(loaded.path)
    if cfg.finetune.qat:
        rec.update(method=f"qat {cfg.finetune.qat}", source=str(loaded.path), qat=cfg.finetune.qat)
    return {"compression": rec} if rec else {}


def finish_qat(cfg, trainer, model: nn.Module, meta: dict, metrics: dict):
    """After training: quantize the layers for real and replace the final checkpoint (collective)."""
    record = convert_qat(model, cfg.finetune.qat, cfg.finetune.qat_group_size)
    meta["compression"] = {**meta.get("compression", {}), "quant": record}
    trainer.meta = meta
    return trainer.save(metrics)


def check_resumable(cfg, run_dir) -> None:
    """trainer.resume=auto of a finished QAT run: its last checkpoint is quantized, nothing to resume."""
    from llmtrain.train import checkpoint as ckpt

    if not cfg.finetune.qat or cfg.trainer.resume != "auto":
        return
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    try:
        newest = ckpt.load_meta(found[-1]) if found else {}
    except UserError:  # a corrupt newest checkpoint is the trainer's to set aside
        return
    if "quant" in compression_of(newest):
        raise UserError(f"{found[-1]} is the quantized end of a finished QAT run; nothing to resume")
