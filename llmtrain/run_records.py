"""What a run directory records about the run: the resolved config (config.yaml), the
command-line overrides (overrides.yaml) and what produced it (run_info.json)."""

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
from llmtrain.files import atomic_write
from llmtrain.runtime import hydra_overrides


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
