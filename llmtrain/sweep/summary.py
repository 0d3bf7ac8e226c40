"""The table at the end of a sweep: each job's overrides, status and final metrics, best marked.

Reads only files in the job directories (status.json, metrics.jsonl, overrides.yaml), so it works
whatever launcher ran the jobs (in-process, joblib workers, SLURM) and can be rerun by hand:

    python -m llmtrain.sweep.summary multirun/pretrain/2026-11-23/12-00-00
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain.files import atomic_write
from llmtrain.sweep.job import ERROR_FILE, STATUS_FILE, direction as metric_direction
from llmtrain.train.tracking import METRICS_FILE, read_records

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


@dataclass
class JobRow:
    dir: Path
    status: str  # completed | failed | interrupted (by a signal) | incomplete (no status.json: killed, running)
    overrides: list[str] = field(default_factory=list)
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # last value of each key
    objective: float | None = None
    error: str | None = None
    best: bool = False

    @property
    def name(self) -> str:
        return self.dir.name


def _float(v: Any) -> float | None:
    try:
        return float(v)  # metrics.jsonl writes non-finite values as "nan" / "inf" strings
    except (TypeError, ValueError):
        return None


def read_last_metrics(path: Path) -> tuple[int | None, dict[str, float]]:
    """Last step and the last value of every metric in a metrics.jsonl (torn lines skipped)."""
    step, last = None, {}
    if not path.exists():
        return step, last
    for rec in read_records(path):
        step = rec.get("step", step)
        for k, v in rec.items():
            if k != "step" and (f := _float(v)) is not None:
                last[k] = f
    return step, last


def _read_overrides(job_dir: Path) -> list[str]:
    path = job_dir / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # noqa: BLE001 - a damaged file only loses the overrides column
        return []


def read_job(job_dir: Path) -> JobRow:
    status: dict[str, Any] = {}
    if (job_dir / STATUS_FILE).exists():
        try:
            status = json.loads((job_dir / STATUS_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            status = {}
    step, metrics = read_last_metrics(job_dir / METRICS_FILE)
    row = JobRow(
        dir=job_dir,
        status=status.get("status", "incomplete"),
        overrides=list(status.get("overrides") or _read_overrides(job_dir)),
        step=step,
        metrics=metrics,
        error=status.get("error"),
    )
    if row.status == "failed" and not row.error and (job_dir / ERROR_FILE).exists():
        row.error = (job_dir / ERROR_FILE).read_text(encoding="utf-8").splitlines()[0]
    if row.status == "completed":
        value = _float(status.get("value"))
        if value is None and status.get("metric"):
            value = metrics.get(status["metric"])
        row.objective = value
    return row


def _job_key(d: Path) -> tuple:
    return (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name)


def collect(sweep_dir: Path, since: float | None = None) -> list[JobRow]:
    """Job directories of a sweep (those with a status, config or metrics file), in job order.

    `since`: skip directories untouched since then (jobs of an earlier sweep into the same dir).
    """
    rows = []
    for d in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=_job_key):
        markers = [d / f for f in (STATUS_FILE, METRICS_FILE, "config.yaml") if (d / f).exists()]
        if not markers or (since is not None and max(m.stat().st_mtime for m in markers) < since):
            continue
        rows.append(read_job(d))
    return rows


def split_overrides(rows: list[JobRow]) -> tuple[list[str], dict[str, str]]:
    """Override keys that vary between jobs (table columns) and the ones shared by all (one line)."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r.overrides) for r in rows]
    keys: list[str] = []
    for p in parsed:
        keys += [k for k in p if k not in keys]
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    fixed = {k: parsed[0][k] for k in keys if k not in varying} if parsed else {}
    return varying, fixed


def mark_best(rows: list[JobRow], direction: str) -> JobRow | None:
    ok = [r for r in rows if r.status == "completed" and r.objective is not None and math.isfinite(r.objective)]
    if not ok:
        return None
    best = (max if direction == "maximize" else min)(ok, key=lambda r: r.objective)
    best.best = True
    return best


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) and 1e-3 <= abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def _short_number(v: str) -> str:
    try:
        return f"{float(v):.4g}" if len(v) > 8 else v
    except ValueError:
        return v


@dataclass
class Summary:
    header: list[str]
    rows: list[list[Any]]  # raw values, one list per job, aligned with header
    fixed: dict[str, str]
    varying: list[str]  # override keys shown as columns
    metric: str
    direction: str
    best: JobRow | None

    def markdown(self, max_error: int = 100) -> str:
        def cell(v: Any, col: str) -> str:
            if col in self.varying:  # Optuna's samples: 0.0008291512779278928 -> 0.0008292
                v = _short_number(v)
            s = _fmt(v).replace("|", "\\|")
            return s[: max_error - 3] + "..." if col == "error" and len(s) > max_error else s

        cols = [c for c in self.header if c not in ("overrides", "dir")]
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for raw in self.rows:
            values = dict(zip(self.header, raw))
            lines.append("| " + " | ".join(cell(values[c], c) for c in cols) + " |")
        return "\n".join(lines)

    def text(self) -> str:
        statuses = [r[self.header.index("status")] for r in self.rows]
        n_failed, n_interrupted = statuses.count("failed"), statuses.count("interrupted")
        stopped = f", {n_interrupted} interrupted" if n_interrupted else ""
        head = [
            f"sweep summary: {len(self.rows)} jobs, {n_failed} failed{stopped}; "
            f"best ({self.direction} {self.metric}) marked *"
        ]
        if self.fixed:
            head.append("shared overrides: " + " ".join(f"{k}={v}" for k, v in self.fixed.items()))
        if self.best is not None:
            varying = [o for o in self.best.overrides if o.split("=", 1)[0] not in self.fixed]
            head.append(f"best: job {self.best.name} {self.metric}={_fmt(self.best.objective)} " + " ".join(varying))
        return "\n".join(head) + "\n\n" + self.markdown() + "\n"


def build_summary(rows: list[JobRow], metric: str, direction: str) -> Summary:
    best = mark_best(rows, direction)
    varying, fixed = split_overrides(rows)
    metric_cols: list[str] = ["train/loss"] if any("train/loss" in r.metrics for r in rows) else []
    for r in rows:  # every validation metric any job reported, in first-seen order
        metric_cols += [k for k in r.metrics if k.startswith("val/") and k not in metric_cols]
    header = ["job", "status", "best", *varying, "step", *metric_cols, "error", "overrides", "dir"]
    table = []
    for r in rows:
        ov = dict(o.split("=", 1) if "=" in o else (o, "") for o in r.overrides)
        table.append(
            [
                r.name,
                r.status,
                "*" if r.best else "",
                *(ov.get(k, "") for k in varying),
                r.step,
                *(r.metrics.get(k) for k in metric_cols),
                r.error or "",
                " ".join(r.overrides),
                str(r.dir),
            ]
        )
    return Summary(header, table, fixed, varying, metric, direction, best)


def write_summary(
    sweep_dir: Path, metric: str = "val/loss", direction: str | None = None, since: float | None = None
) -> Summary | None:
    """Collect the jobs of `sweep_dir`, write summary.csv and summary.md there; None if no jobs."""
    rows = collect(sweep_dir, since)
    if not rows:
        return None
    summary = build_summary(rows, metric, direction or metric_direction(metric))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(summary.header)
    writer.writerows([["" if v is None else v for v in row] for row in summary.rows])
    atomic_write(sweep_dir / SUMMARY_CSV, buf.getvalue())
    atomic_write(sweep_dir / SUMMARY_MD, "# Sweep summary\n\n" + summary.text())
    return summary


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m llmtrain.sweep.summary SWEEP_DIR [METRIC] [minimize|maximize]")
        return 0 if args else 2
    sweep_dir = Path(args[0])
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir} is not a directory", file=sys.stderr)
        return 2
    summary = write_summary(sweep_dir, *(args[1:3]))
    if summary is None:
        print(f"error: no job directories in {sweep_dir}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
