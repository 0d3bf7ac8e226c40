"""Where metrics go: metrics.jsonl in the run directory always, plus an optional tracker
(wandb, tensorboard). Names are wandb-style (`train/loss`, `val/loss`) everywhere.

Trackers are imported only when chosen. wandb gets the resolved config, run_info.json (git commit,
package versions, devices) and the job's overrides; its files live under RUN_DIR/wandb, so an
offline run (logger.mode=offline, or WANDB_MODE=offline) is synced later with
`wandb sync RUN_DIR/wandb/offline-run-*`. In a sweep (-m) the runs are grouped by sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

from llmtrain.config.schema import LoggerConfig
from llmtrain.errors import UserError
from llmtrain.files import atomic_write

WANDB_MODES = ("online", "offline", "disabled")


METRICS_FILE = "metrics.jsonl"


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl, in file order. Blank lines and torn ones (a run
    killed mid-write) are skipped; non-finite values are the strings "nan" / "inf" here."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def reconcile_metrics(path: Path, through: int | None) -> None:
    """Make metrics.jsonl read as one run that continues from the checkpoint of step `through`
    (None: from scratch, so no record is kept). Records of later steps are dropped (written
    after that checkpoint by an interrupted run), torn lines too, and of two records of one step
    with the same keys the later one is kept (an older run's rows that a later run rewrote).
    Rewritten atomically, and only when something changes; called before the logger opens it."""
    if not path.exists():
        return
    if through is None:
        path.unlink()
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    records = [(json.dumps(r) + "\n", r) for r in read_records(path)]
    keep = [(line, r) for line, r in records if isinstance(r.get("step"), int) and r["step"] <= through]
    last = {(r["step"], tuple(sorted(r))): i for i, (_, r) in enumerate(keep)}
    kept = [line for i, (line, r) in enumerate(keep) if last[(r["step"], tuple(sorted(r)))] == i]
    if kept != lines:
        atomic_write(path, "".join(kept))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends one JSON object per event to metrics.jsonl; forwards to a tracker if configured.

    Only the process that owns the run directory (rank 0) should create one with enabled=True.
    Creating it checks the tracker choice and writes nothing; `open()` starts the tracker and
    opens the file, once the run is known to go ahead (llmtrain/run_dir.py).
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: dict | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self._run_dir, self._cfg, self._config_dict = run_dir, cfg, config_dict
        self._backend = None
        self._file = None
        if enabled:  # a missing package or a bad logger.mode fails here, before any file exists
            _check_backend(cfg)

    def open(self) -> MetricsLogger:
        if self.enabled and self._file is None:
            # The tracker first: if it cannot start, metrics.jsonl is not touched.
            self._backend = _make_backend(self._cfg, self._run_dir, self._config_dict)
            self._file = open(self.path, "a", encoding="utf-8")
        return self

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log before open()")
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._backend is not None:
            self._backend.log(metrics, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None


# --------------------------------------------------------------------------- run identity
def _hydra():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except (ValueError, ImportError):  # outside Hydra (tests, scripts)
        return None


def _display_path(path: Path) -> str:
    """A path relative to the working directory when it is inside it (shorter, machine-independent)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def sweep_group() -> str | None:
    """The sweep this job belongs to (its hydra.sweep.dir), or None for a single run."""
    from hydra.types import RunMode

    hc = _hydra()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    return _display_path(Path(str(hc.sweep.dir)))


def default_run_name(run_dir: Path) -> str:
    """The run directory, e.g. outputs/pretrain/2026-11-23/12-00-00 or multirun/.../3."""
    return _display_path(run_dir)


def job_overrides() -> list[str]:
    hc = _hydra()
    return list(hc.overrides.task) if hc is not None else []


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------ backends
class _WandbBackend:
    @staticmethod
    def check(cfg: LoggerConfig) -> None:
        if cfg.mode not in WANDB_MODES:
            raise UserError(f"logger.mode={cfg.mode!r} is not one of {', '.join(WANDB_MODES)}")
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("logger=wandb needs the wandb package: pip install wandb") from None

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config_dict: dict | None):
        self.check(cfg)
        import wandb

        config = dict(config_dict or {})
        config["overrides"] = job_overrides()
        if (info := _read_json(run_dir / "run_info.json")) is not None:  # written by the stage
            config["run_info"] = info
        stage = (config_dict or {}).get("stage")
        try:
            self.run = wandb.init(
                project=cfg.project,
                name=cfg.run_name or default_run_name(run_dir),
                group=cfg.group or sweep_group(),
                tags=list(cfg.tags) or None,
                job_type=stage,
                mode=cfg.mode,
                dir=str(run_dir),
                config=config,
                reinit=True,
            )
        except Exception as e:  # noqa: BLE001 - login / network problems are the user's to fix
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"logger=wandb: wandb.init failed ({first}); run `wandb login`, "
                f"or use logger.mode=offline and `wandb sync` later"
            ) from None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoardBackend:
    @staticmethod
    def check() -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from None

    def __init__(self, run_dir: Path, config_dict: dict | None):
        self.check()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if config_dict:  # the config as text, shown in TensorBoard's Text tab
            from omegaconf import OmegaConf

            self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(config_dict) + "\n```", 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _check_backend(cfg: LoggerConfig) -> None:
    """What can fail before the tracker starts: an unknown name or mode, a missing package."""
    if cfg.name == "wandb":
        _WandbBackend.check(cfg)
    elif cfg.name == "tensorboard":
        _TensorBoardBackend.check()
    elif cfg.name != "console":
        raise UserError(f"unknown logger.name {cfg.name!r}; available: console, tensorboard, wandb")


def _make_backend(cfg: LoggerConfig, run_dir: Path, config_dict: dict | None):
    if cfg.name == "console":
        return None
    if cfg.name == "wandb":
        return _WandbBackend(cfg, run_dir, config_dict)
    if cfg.name == "tensorboard":
        return _TensorBoardBackend(run_dir, config_dict)
    raise UserError(f"unknown logger.name {cfg.name!r}; available: console, tensorboard, wandb")
