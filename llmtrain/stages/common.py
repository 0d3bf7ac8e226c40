"""What every stage needs: the run directory, device, tokenizer, data splits and the model.

Stages stay short functions over (config, registry, trainer) by calling these.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from llmtrain.config.schema import ModelConfig, RunConfig
from llmtrain.data.corpus import TokenSplits, split_tokens
from llmtrain.data.sources import read_documents
from llmtrain.distributed import DistInfo, broadcast_str, init_distributed
from llmtrain.errors import UserError
from llmtrain.models import build_model
from llmtrain.tokenizers import Tokenizer, tokenizer_from_state
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.device import pick_device, pick_precision


@dataclass
class Runtime:
    run_dir: Path
    device: torch.device
    precision: str
    dist: DistInfo

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def hydra_run_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra (tests, scripts)
        return Path.cwd()


def hydra_overrides() -> list[str]:
    """The command-line overrides of this job (for sweep summaries and plot legends)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def setup_runtime(cfg: RunConfig, run_dir: Path | None = None) -> Runtime:
    device = pick_device(cfg.trainer.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device.type)
    # Every rank must use rank 0's run directory (Hydra's ${now:} differs between processes).
    run_dir = Path(broadcast_str(str(run_dir or hydra_run_dir())))
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    precision = pick_precision(cfg.trainer.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.trainer.seed + dist.rank)
    return Runtime(run_dir=run_dir, device=device, precision=precision, dist=dist)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def write_run_files(run_dir: Path, cfg: RunConfig) -> None:
    """The resolved config and what produced the run (git commit, versions, devices)."""
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
    atomic_write(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(hydra_overrides())))
    atomic_write(run_dir / "run_info.json", json.dumps(run_info(), indent=2))


def run_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        from importlib.metadata import version

        info["llmtrain"] = version("llmtrain")
    except Exception:
        pass
    try:
        repo = Path(__file__).resolve().parents[2]
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------- tokenizer and data
def load_corpus(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenSplits]:
    """Read data.path, build (or reuse) the tokenizer, and split into train / validation tokens."""
    docs = read_documents(cfg.data.path, cfg.data.text_field, cfg.data.encoding_errors, cfg.data.doc_pattern)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, docs)
    splits = split_tokens(docs, tokenizer, cfg.data.val_fraction)
    if len(splits.train) <= cfg.data.seq_len + 1:
        raise UserError(f"data {cfg.data.path}: {len(splits.train)} training tokens are too few "
                        f"for data.seq_len={cfg.data.seq_len}")
    return tokenizer, splits


def build_tokenizer(cfg: RunConfig, docs: list[str]) -> Tokenizer:
    try:
        from llmtrain.tokenizers.train import build_tokenizer as build
    except ImportError:  # only the char tokenizer is available
        build = None
    if build is not None:
        default = Path(cfg.data.path or ".").with_suffix("").name + f".sp{cfg.tokenizer.vocab_size}.model"
        return build(cfg.tokenizer, lambda: docs, default_path=Path(cfg.data.cache_dir or ".") / default)
    from llmtrain.registry import get

    return get("tokenizer", cfg.tokenizer.name).train(docs, cfg.tokenizer)


# ----------------------------------------------------------------------------- model
def resolve_model_config(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """Fill vocab_size from the tokenizer (padded up: multiples of 64 run faster on GPUs)."""
    if model.vocab_size and model.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({tokenizer.vocab_size})")
    if model.vocab_size:
        return model
    mult = max(1, model.pad_vocab_multiple)
    return dataclasses.replace(model, vocab_size=-(-tokenizer.vocab_size // mult) * mult)


def checkpoint_meta(cfg: RunConfig, model_cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    return {
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer.state(),
        "objective": cfg.objective.name,
        "stage": cfg.stage,
        "config": config_dict(cfg),
    }


@dataclass
class LoadedCheckpoint:
    path: Path
    model: torch.nn.Module
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    meta: dict[str, Any]


def load_checkpoint(path: str, device: torch.device | None = None) -> LoadedCheckpoint:
    """A checkpoint (or run dir) -> model with weights, its config and tokenizer."""
    ck = ckpt.resolve_checkpoint(path)
    meta = ckpt.load_meta(ck)
    try:
        model_cfg = ModelConfig(**meta["model"])
        tokenizer = tokenizer_from_state(meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata {ck / ckpt.META} is incomplete or foreign: {e}") from None
    model = build_model(model_cfg)
    ckpt.load_model_state(model, ckpt.load_weights(ck), ck)
    if device is not None:
        model.to(device)
    return LoadedCheckpoint(path=ck, model=model, model_cfg=model_cfg, tokenizer=tokenizer, meta=meta)
