"""Checkpoints: a directory per save, written under a temporary name and renamed when complete.

    RUN_DIR/checkpoints/step_000500/
        model.safetensors   full (consolidated) weights, no pickle
        meta.json           model config, tokenizer state, step, metrics, the run config
        train_state.pt      optimizer / scheduler / per-rank RNG state, loaded with weights_only=True
    RUN_DIR/best_checkpoint    "checkpoints/step_NNNNNNN": the one with the lowest val/loss (a pointer)

A directory without meta.json is never considered complete, and a rename is atomic, so a kill
during a save leaves the previous checkpoint as the newest complete one. The format is the same
for every strategy: under FSDP the trainer gathers full weights and optimizer state to rank 0
(see Trainer.save), so evaluate/generate/export and a resume with another strategy or world size
read it unchanged. Only rank 0 writes; the other ranks wait at a barrier.

Retention: the newest `keep_last` checkpoints, plus the best by validation loss (only checkpoints
whose metrics were measured at their own step compete), are kept; older ones are deleted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmtrain.errors import UserError
from llmtrain.files import atomic_write, fsync_dir, fsync_tree

WEIGHTS, META, STATE = "model.safetensors", "meta.json", "train_state.pt"
BEST = "best_checkpoint"  # in the run directory, next to checkpoints/
FORMAT = "llmtrain-checkpoint-v1"


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (tied embeddings)."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def _contiguous_state(
    model: torch.nn.Module | dict[str, torch.Tensor], aliases: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage: keep one name per tensor (tied weights are re-tied on load).
    state = model if isinstance(model, dict) else model.state_dict()
    out, seen = {}, set()
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (name,)
        if key in seen or name in aliases:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def _val_loss(ckpt: Path) -> float | None:
    """val/loss measured at this checkpoint's own step, else None."""
    try:
        meta = json.loads((ckpt / META).read_text())
        metrics = meta.get("metrics") or {}
        if meta.get("metrics_step") != meta.get("step") or "val/loss" not in metrics:
            return None
        return float(metrics["val/loss"])
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def best_checkpoint(ckpt_root: Path) -> Path | None:
    """The complete checkpoint with the lowest validation loss (ties: the older one). Only finite
    losses compete: a diverged run's NaN or inf never becomes the best."""
    scored = [(v, p) for p in list_checkpoints(ckpt_root) if (v := _val_loss(p)) is not None and math.isfinite(v)]
    return min(scored, key=lambda vp: vp[0])[1] if scored else None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints and the best one; update the `best` pointer."""
    best = best_checkpoint(ckpt_root)
    if best is not None:
        atomic_write(ckpt_root.parent / BEST, f"{ckpt_root.name}/{best.name}\n")
    if keep_last > 0:
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    keep_last: int = 0,
    aliases: set[str] = frozenset(),
) -> Path:
    """Write a checkpoint of `model` (a module, or a full state dict minus `aliases`) atomically."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp-step_{step:07d}-{os.getpid()}"
    tmp.mkdir()
    save_file(_contiguous_state(model, aliases), str(tmp / WEIGHTS), metadata={"format": FORMAT})
    if train_state is not None:
        torch.save(train_state, tmp / STATE)
    meta = {"format": FORMAT, "step": step, **meta}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    fsync_tree(tmp)  # the data must be on disk before the rename makes it the checkpoint
    if final.exists():  # re-saving the same step: move the old one aside first
        old = ckpt_root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(ckpt_root)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under ckpt_root, oldest first."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step_*") if (p / META).is_file() and (p / WEIGHTS).is_file()]
    return sorted(done, key=lambda p: p.name)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, a file in it, a run dir (-> its newest checkpoint) or its best_checkpoint file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint not found: {path}")
    if p.is_file() and p.name == BEST:  # the run's pointer to its best checkpoint
        target = p.parent / p.read_text().strip()
        if not (target / META).is_file():
            raise UserError(f"{path} points to {target}, which is not a complete checkpoint")
        return target
    if p.is_file():
        p = p.parent
    if (p / META).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"not an llmtrain checkpoint or run directory (no {META}): {path}")


def load_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"unreadable checkpoint metadata {ckpt / META}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"not an llmtrain checkpoint (unknown format): {ckpt / META}")
    return meta


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    f = ckpt / WEIGHTS
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"corrupt or unreadable weights file {f}: {str(e).splitlines()[0]}") from None


def load_train_state(ckpt: Path) -> dict[str, Any] | None:
    f = ckpt / STATE
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/format failure is a bad file, not a crash
        raise UserError(f"corrupt or unreadable training state {f}: {str(e).splitlines()[0]}") from None


def load_model_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load weights; tied parameters absent from the file are fine (they share storage)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: a checkpoint of another model size
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {source} does not match the model: {first}") from None
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k not in tied]
    if strict and (missing or result.unexpected_keys):
        what = missing[:3] or result.unexpected_keys[:3]
        raise UserError(f"checkpoint {source} does not match the model (e.g. {', '.join(what)})")
    return missing, list(result.unexpected_keys)
