"""What a run directory records about the run: the resolved config (config.yaml), the
command-line overrides (overrides.yaml), and what produced it and what it read (run_info.json:
commit, versions, devices, and each data file with its size and sha256)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.files import atomic_write, sha256_file
from llmtrain.runtime import hydra_overrides


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def write_run_files(run_dir: Path, cfg: RunConfig, data_paths: list[str | None] | None = None) -> None:
    """The resolved config and what produced the run (git commit, versions, devices) and read:
    the files of `data_paths` (default: the data sources cfg names for its stage)."""
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
    atomic_write(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(hydra_overrides())))
    info = run_info()
    info["data_files"] = data_files(data_paths if data_paths is not None else data_sources(cfg))
    atomic_write(run_dir / "run_info.json", json.dumps(info, indent=2))


def data_sources(cfg: RunConfig) -> list[str | None]:
    """The data sources a training stage reads: text (data.path, data.val_path) or a task's files."""
    if cfg.stage == "finetune" and cfg.task.name != "lm":
        return [cfg.task.train_path, cfg.task.val_path]
    return [cfg.data.path, cfg.data.val_path]


def data_files(paths: list[str | None]) -> list[dict[str, Any]]:
    """Each local file of the given sources with its size and sha256 (a hub dataset: its name),
    so two runs on different files never look alike."""
    from llmtrain.data.prepare import source_files

    out: list[dict[str, Any]] = []
    for path in paths:
        if not path:
            continue
        try:
            files = source_files(path)
        except UserError:
            files = []
        if not files:
            out.append({"path": path})
        for f in files:
            digest, size = sha256_file(f)
            out.append({"path": str(f.resolve()), "size": size, "sha256": digest})
    return out


def run_info() -> dict[str, Any]:
    """What produced a run: command line, git commit (from a checkout), package versions, devices."""
    from importlib.metadata import PackageNotFoundError, version

    # Versions worth recording (those installed): what decides a run's numbers and files.
    package_names = (
        "llmtrain",
        "torch",
        "numpy",
        "hydra-core",
        "omegaconf",
        "safetensors",
        "transformers",
        "tokenizers",
        "sentencepiece",
        "datasets",
        "hydra-optuna-sweeper",
        "optuna",
        "wandb",
        "tensorboard",
        "hydra-joblib-launcher",
        "hydra-submitit-launcher",
    )
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
    repo = Path(__file__).resolve().parents[1]
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5
            ).stdout.strip()

        # Only our own checkout: an installed copy under some other repository (a venv inside a
        # project) must not report that repository's commit.
        top = git("rev-parse", "--show-toplevel")
        if top and Path(top).resolve() == repo:
            info["git_commit"] = git("rev-parse", "HEAD") or None
            info["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return info
