"""What a run directory records about the run: the resolved config (config.yaml), the
command-line overrides (overrides.yaml), what produced it and what it read (run_info.json:
commit, versions, devices, and each data file with its size and sha256), Hydra's own record
(.hydra/config.yaml, hydra.yaml, overrides.yaml) and the console output (<stage>.log)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

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
    write_hydra_record(run_dir, cfg)


def write_hydra_record(run_dir: Path, cfg: RunConfig) -> None:
    """.hydra/ as Hydra writes it (config.yaml, hydra.yaml, overrides.yaml), written here, once the
    inputs are known to be good: Hydra's own (hydra.output_subdir) would be written before the job
    validates them, over an earlier run's record (conf/common.yaml turns it off)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # outside a Hydra job (tests, scripts): nothing of Hydra's to record
        return
    record = run_dir / ".hydra"
    record.mkdir(exist_ok=True)
    atomic_write(record / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    atomic_write(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    atomic_write(record / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))


@contextlib.contextmanager
def console_log() -> Iterator[None]:
    """Within a Hydra job on rank 0: stdout and stderr also go to RUN_DIR/<job name>.log."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:
        hc = None
    if hc is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    out, err = sys.stdout, sys.stderr
    with open(Path(hc.runtime.output_dir) / f"{hc.job.name}.log", "a", encoding="utf-8") as log:
        sys.stdout, sys.stderr = ConsoleLog(out, log), ConsoleLog(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


class ConsoleLog:
    """The job's console output, also appended to RUN_DIR/<stage>.log (Hydra's job log file): a
    file-like that writes through to the console stream and, line by line, to the log. A progress
    bar's redraws (carriage returns) leave only their last state in the log."""

    def __init__(self, stream, log) -> None:
        self.stream, self.log, self._line = stream, log, ""

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        self._line += text
        if "\n" in self._line:
            *lines, self._line = self._line.split("\n")
            self.log.write("".join(ln.rsplit("\r", 1)[-1] + "\n" for ln in lines))
            self.log.flush()
        self._line = self._line.rsplit("\r", 1)[-1]  # a bar redrawn for hours keeps one frame
        return n

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ... of the console stream
        return getattr(self.stream, name)


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
