"""One job of a sweep: its objective value for the sweeper and its status record (status.json).

A sweep must survive a failing job: the CLI's task function calls `finish_job` / `fail_job`, which
record the outcome in the job directory and hand the sweeper a float. Optuna needs a float for
every trial (and rejects NaN), so a failed job, a NaN metric or a missing metric count as the
worst possible value for the sweep's direction: +inf when minimising, -inf when maximising. The
trial then ranks last instead of aborting the study; status.json says what really happened.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
ERROR_FILE = "error.txt"
# Metric names that grow with quality; everything else (loss, ppl, bpb) is minimised.
_MAXIMIZED = ("acc", "f1", "exact_match", "em", "rouge", "bleu", "mcc", "auc")


def hydra_job() -> Any | None:
    """Hydra's runtime config of this process, or None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except (ValueError, ImportError):
        return None


def in_multirun() -> bool:
    from hydra.types import RunMode

    hc = hydra_job()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def direction(metric: str, hydra_cfg: Any | None = None) -> str:
    """'minimize' or 'maximize': the sweeper's setting (Optuna) if it has one, else by metric name."""
    hc = hydra_cfg if hydra_cfg is not None else hydra_job()
    d = hc.sweeper.get("direction") if hc is not None and "sweeper" in hc else None
    d = getattr(d, "name", d)  # the Optuna plugin's default is an Enum
    if isinstance(d, str):
        return d.lower()
    return "maximize" if metric.rsplit("/", 1)[-1].lower().startswith(_MAXIMIZED) else "minimize"


def worst(dir_: str) -> float:
    return -math.inf if dir_ == "maximize" else math.inf


def objective_value(value: Any, metric: str) -> float:
    """The float a sweeper gets: the metric, or the worst value when it is missing or NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    return worst(direction(metric)) if math.isnan(v) else v


def _json_float(v: float | None) -> float | str | None:
    """Strict JSON has no NaN/Infinity: write those as strings, like metrics.jsonl does."""
    return str(v) if v is not None and not math.isfinite(v) else v


def _job_dir() -> Path:
    hc = hydra_job()
    return Path(hc.runtime.output_dir) if hc is not None else Path.cwd()


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _write_status(record: dict[str, Any]) -> None:
    from llmtrain.files import atomic_write

    hc = hydra_job()
    record = {
        "job_num": int(hc.job.num) if hc is not None and hc.job.get("num") is not None else None,
        "overrides": list(hc.overrides.task) if hc is not None else [],
        **record,
        "finished_at": time.time(),
    }
    d = _job_dir()
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / STATUS_FILE, json.dumps(record, indent=2, default=str) + "\n")


def finish_job(value: Any, metric: str, started: float) -> float:
    """A job that ran to the end: record its metric; return the sweeper's float."""
    out = objective_value(value, metric)
    if _is_main_rank():
        raw = None if value is None else float(value)
        _write_status(
            {
                "status": "completed",
                "metric": metric,
                "value": _json_float(raw),
                "objective": _json_float(out),
                "error": None,
                "elapsed_s": round(time.time() - started, 3),
            }
        )
    return out


def interrupt_job(exc: BaseException, metric: str, started: float) -> None:
    """A job stopped by a signal after saving its checkpoint: recorded as interrupted (it can be
    resumed), never as completed, so its partial metric does not rank against finished jobs."""
    if _is_main_rank():
        _write_status(
            {
                "status": "interrupted",
                "metric": metric,
                "value": None,
                "objective": _json_float(worst(direction(metric))),
                "error": str(exc),
                "elapsed_s": round(time.time() - started, 3),
            }
        )


def error_line(exc: BaseException) -> str:
    from llmtrain.errors import UserError

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, UserError):
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def fail_job(exc: BaseException, metric: str, started: float) -> float:
    """A job that raised inside a sweep: record the error, print one line, return the worst value."""
    from llmtrain.errors import UserError

    line = error_line(exc)
    hc = hydra_job()
    num = hc.job.get("num") if hc is not None else None
    print(f"error: job {num}: {line}", file=sys.stderr, flush=True)
    out = worst(direction(metric))
    if _is_main_rank():
        from llmtrain.files import atomic_write

        d = _job_dir()
        d.mkdir(parents=True, exist_ok=True)
        # A user error is fully described by its line; anything else keeps its traceback.
        detail = (
            ""
            if isinstance(exc, UserError)
            else "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )
        atomic_write(d / ERROR_FILE, line + "\n" + detail)
        _write_status(
            {
                "status": "failed",
                "metric": metric,
                "value": None,
                "objective": _json_float(out),
                "error": line,
                "elapsed_s": round(time.time() - started, 3),
            }
        )
    return out
