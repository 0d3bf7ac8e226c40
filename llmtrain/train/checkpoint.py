"""Checkpoints: a directory per save, written under a temporary name and renamed when complete.

    RUN_DIR/checkpoints/step_000500/
        model.safetensors   full (consolidated) weights, no pickle
        meta.json           model config, tokenizer state, step, metrics, the run config
        train_state.pt      optimizer / scheduler / per-rank RNG state, loaded with weights_only=True
    RUN_DIR/best_checkpoint    "checkpoints/step_NNNNNNN": the one with the lowest val/loss (a pointer)

A directory without meta.json is never considered complete, and a rename is atomic, so a kill
during a save leaves the previous checkpoint as the newest complete one. meta.json records the
sha256 and size of every other file (`files`; a file added later, e.g. finetune's adapter,
through `add_file`); loads verify them (`verify`), and `trainer.resume=auto` skips a checkpoint
that fails for the newest one that passes (`newest_intact`). Checkpoints older than the record
have nothing to verify and load as before. A full disk is one line naming the checkpoint and its
size; the half-written directory is removed, the previous checkpoints are untouched.

Test hook: LLMTRAIN_TEST_SAVE_DELAY=SECONDS (or STEP:SECONDS, that step's save only) sleeps after
the weights are written and before the rename, so a test can kill -9 a run inside a save. The format is the same
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
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmtrain.errors import UserError
from llmtrain.files import (
    atomic_replace,
    atomic_write,
    disk_full,
    file_mode,
    free_bytes,
    fsync_dir,
    fsync_tree,
    is_disk_full,
    sha256_file,
    tmp_name,
)

WEIGHTS, META, STATE = "model.safetensors", "meta.json", "train_state.pt"
BEST = "best_checkpoint"  # in the run directory, next to checkpoints/
FORMAT = "llmtrain-checkpoint-v1"
FILES = "files"  # meta.json key: {name: {"sha256": hex, "size": bytes}} of the other files
CORRUPT = "corrupt-"  # prefix of a checkpoint that resume set aside (not matched by step_*)
SAVE_DELAY_ENV = "LLMTRAIN_TEST_SAVE_DELAY"


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


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: what a checkpoint of it needs on disk, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file, with the mode of every other file: safetensors writes through a private
    temporary file and renames it, so the weights would otherwise be 0600."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())


def file_record(path: Path) -> dict[str, Any]:
    digest, size = sha256_file(path)
    return {"sha256": digest, "size": size}


def _test_delay(step: int) -> None:
    spec = os.environ.get(SAVE_DELAY_ENV)
    if not spec:
        return
    at, _, secs = spec.rpartition(":")
    if not at or int(at) == step:
        time.sleep(float(secs))


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
    tensors = _contiguous_state(model, aliases)
    try:
        tmp.mkdir()
        write_safetensors(tensors, tmp / WEIGHTS, {"format": FORMAT})
        _test_delay(step)
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
        # hashed from the written files (streamed), so the record is of what is on disk
        files = {name: file_record(tmp / name) for name in (WEIGHTS, STATE) if (tmp / name).is_file()}
        meta = {"format": FORMAT, "step": step, **meta, FILES: files}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        fsync_tree(tmp)  # the data must be on disk before the rename makes it the checkpoint
    except Exception as e:
        free = free_bytes(ckpt_root)
        shutil.rmtree(tmp, ignore_errors=True)
        needed = _nbytes(tensors) + _nbytes(train_state)
        if is_disk_full(e, free, needed):
            raise disk_full(final, needed, free) from None
        raise
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


def add_file(ckpt: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Add a safetensors file to a finished checkpoint and record it in meta.json. The file is
    renamed into place before meta.json names it: a kill in between leaves an unrecorded extra
    file, never a record of a missing one."""
    path = ckpt / name
    tmp = tmp_name(path)
    try:
        write_safetensors(tensors, tmp, metadata)
        record = file_record(tmp)
        atomic_replace(tmp, path)
    except Exception as e:
        free = free_bytes(ckpt)
        tmp.unlink(missing_ok=True)
        if is_disk_full(e, free, _nbytes(tensors)):
            raise disk_full(path, _nbytes(tensors), free) from None
        raise
    meta = load_meta(ckpt)
    meta[FILES] = {**meta.get(FILES, {}), name: record}
    atomic_write(ckpt / META, json.dumps(meta, indent=2, default=str))
    return path


def verify(ckpt: Path, names: list[str] | None = None, meta: dict[str, Any] | None = None) -> None:
    """Check the files meta.json records (or only `names` of them) against their size and
    sha256; a mismatch is a UserError naming the file. Nothing recorded: nothing to check."""
    meta = load_meta(ckpt) if meta is None else meta
    recorded = meta.get(FILES) or {}
    malformed = UserError(f"checkpoint metadata {ckpt / META} has a malformed {FILES!r} record")
    if not isinstance(recorded, dict):
        raise malformed
    for name, rec in recorded.items():
        if names is not None and name not in names:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("size"), int) or not isinstance(rec.get("sha256"), str):
            raise malformed
        f = ckpt / name
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing (recorded in {ckpt / META})")
        size = f.stat().st_size
        if size != rec["size"]:
            raise UserError(f"checkpoint file {f} is corrupt: {size:,} bytes, {META} records {rec['size']:,}")
        if sha256_file(f)[0] != rec["sha256"]:
            raise UserError(f"checkpoint file {f} is corrupt: its sha256 differs from the one in {META}")


def newest_intact(ckpt_root: Path, main: bool = True) -> Path | None:
    """The newest complete checkpoint whose files verify, for trainer.resume=auto. Newer ones
    that fail are skipped with one warning line each and (by the main process) set aside as
    corrupt-step_N, so pruning never keeps them over the run's new checkpoints. If none
    verifies, the newest one's error is raised: nothing is moved, and the run does not start
    over silently."""
    found = list_checkpoints(ckpt_root)
    failed: list[tuple[Path, UserError]] = []
    for cand in reversed(found):
        try:
            verify(cand)
        except UserError as e:
            failed.append((cand, e))
            continue
        if main:
            for bad, e in failed:
                aside = bad.with_name(CORRUPT + bad.name)
                if aside.exists():  # set aside before: keep both
                    aside = aside.with_name(f"{aside.name}-{os.getpid()}")
                bad.rename(aside)
                fsync_dir(ckpt_root)
                print(f"warning: {e}; moved to {aside.name}, resuming from {cand}", file=sys.stderr, flush=True)
        return cand
    if failed:
        raise failed[0][1]
    return None


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
