"""What every stage needs: the run directory, device, tokenizer, data splits and the model.

Stages stay short functions over (config, registry, trainer) by calling these.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from llmtrain.config.schema import ModelConfig, RunConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.data.sources import document_reader
from llmtrain.distributed import barrier, is_main
from llmtrain.errors import UserError
from llmtrain.files import atomic_write
from llmtrain.runtime import Runtime, hydra_overrides, hydra_run_dir, seed_everything, setup_runtime  # noqa: F401
from llmtrain.hf import HF_PREFIX
from llmtrain.models import build_model
from llmtrain.tokenizers import Tokenizer, tokenizer_from_state
from llmtrain.train import checkpoint as ckpt


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def write_run_files(run_dir: Path, cfg: RunConfig) -> None:
    """The resolved config and what produced the run (git commit, versions, devices)."""
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
    atomic_write(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(hydra_overrides())))
    atomic_write(run_dir / "run_info.json", json.dumps(run_info(), indent=2))


def run_info() -> dict[str, Any]:
    """What produced a run: command line, git commit (from a checkout), package versions, devices."""
    from importlib.metadata import PackageNotFoundError, version

    # Versions worth recording (those installed): what decides a run's numbers and files.
    package_names = ("llmtrain", "torch", "numpy", "hydra-core", "omegaconf", "safetensors", "transformers",
                     "tokenizers", "sentencepiece", "datasets", "hydra-optuna-sweeper", "optuna", "wandb",
                     "tensorboard", "hydra-joblib-launcher", "hydra-submitit-launcher")
    info: dict[str, Any] = {
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda": torch.version.cuda,
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    packages = {}
    for name in package_names:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            pass
    info["packages"] = packages
    if "llmtrain" in packages:
        info["llmtrain"] = packages["llmtrain"]
    info["git_commit"], info["git_dirty"] = None, None
    repo = Path(__file__).resolve().parents[2]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=5).stdout.strip()

        # Only our own checkout: an installed copy under some other repository (a venv inside a
        # project) must not report that repository's commit.
        top = git("rev-parse", "--show-toplevel")
        if top and Path(top).resolve() == repo:
            info["git_commit"] = git("rev-parse", "HEAD") or None
            info["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ------------------------------------------------------------------- tokenizer and data
def load_corpus(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenSplits]:
    """The tokenizer (built or reused) and the train / validation tokens of data.path.

    The splits come from the prepared-data cache (llmtrain.data.prepare) as memory-mapped
    arrays; the corpus is only read when a tokenizer must be trained or the cache prepared.
    Rank 0 does that first; the other ranks then find everything in the cache.
    """
    from llmtrain.data.prepare import prepare

    read = document_reader(cfg.data)

    for main_turn in (True, False):
        if is_main() == main_turn:
            tok = tokenizer or build_tokenizer(cfg, read)
            prepared = prepare(cfg.data, tok, docs=read, verbose=main_turn)
        barrier()
    splits = prepared.splits()
    if prepared.reused and is_main():
        print(f"using prepared data {prepared.dir}", flush=True)
    if len(splits.train) <= cfg.data.seq_len + 1:
        raise UserError(f"data {cfg.data.path}: {len(splits.train)} training tokens are too few "
                        f"for data.seq_len={cfg.data.seq_len}")
    return tok, splits


def build_tokenizer(cfg: RunConfig, docs: list[str] | Callable[[], list[str]]) -> Tokenizer:
    """The tokenizer cfg.tokenizer asks for; `docs` (or a function returning them) is only read
    when one has to be trained. A sentencepiece model without tokenizer.path is trained once per
    corpus and settings into <cache root>/tokenizers/ and reused from there while its settings
    JSON matches."""
    from llmtrain.data.prepare import _sha, cache_root, source_fingerprint
    from llmtrain.tokenizers.sentencepiece import SentencePieceTokenizer
    from llmtrain.tokenizers.train import _trainer_kwargs, build_tokenizer as build, train_sentencepiece

    docs_fn = docs if callable(docs) else (lambda: docs)
    tc = cfg.tokenizer
    if tc.name != "sentencepiece" or (tc.path and Path(tc.path).exists()):
        return build(tc, docs_fn)
    if tc.path:
        target = Path(tc.path)
    else:
        # The settings as train_sentencepiece records them in the model's JSON sidecar.
        settings = json.loads(json.dumps({k: v for k, v in _trainer_kwargs(tc).items()
                                          if k not in ("num_threads", "minloglevel")}))
        key = _sha([source_fingerprint(cfg.data), settings])[:16]
        target = cache_root(cfg.data.cache_dir) / "tokenizers" / f"sp-{tc.model_type}{tc.vocab_size}-{key}.model"
        try:
            recorded = json.loads(target.with_suffix(".json").read_text()).get("settings")
        except (OSError, ValueError):
            recorded = None
        if target.exists() and recorded == settings:
            print(f"using sentencepiece tokenizer {target}", flush=True)
            return SentencePieceTokenizer.load(target)
    print(f"training sentencepiece tokenizer ({tc.model_type}, vocab {tc.vocab_size}) on {cfg.data.path} "
          f"-> {target}", flush=True)
    return train_sentencepiece(docs_fn(), tc, target)


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


def read_checkpoint(path: str) -> tuple[Path, dict[str, Any], ModelConfig, Tokenizer]:
    """A checkpoint (or run dir) -> its directory, metadata, model config and tokenizer (no weights)."""
    ck = ckpt.resolve_checkpoint(path)
    meta = ckpt.load_meta(ck)
    try:
        model_cfg = ModelConfig(**meta["model"])
        tokenizer = tokenizer_from_state(meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata {ck / ckpt.META} is incomplete or foreign: {e}") from None
    return ck, meta, model_cfg, tokenizer


def load_checkpoint(path: str, device: torch.device | None = None) -> LoadedCheckpoint:
    """A checkpoint (or run dir) -> model with weights, its config and tokenizer.
    hf:DIR (or a Hub id) loads a transformers GPT-2 / LLaMA / BERT directory instead."""
    if str(path).startswith(HF_PREFIX):
        from llmtrain.hf.load import load_hf

        hf_dir, model, model_cfg, tokenizer, meta = load_hf(str(path), device)
        return LoadedCheckpoint(path=hf_dir, model=model, model_cfg=model_cfg, tokenizer=tokenizer, meta=meta)
    ck, meta, model_cfg, tokenizer = read_checkpoint(path)
    model = build_model(model_cfg)
    ckpt.load_model_state(model, ckpt.load_weights(ck), ck)
    if device is not None:
        model.to(device)
    return LoadedCheckpoint(path=ck, model=model, model_cfg=model_cfg, tokenizer=tokenizer, meta=meta)
