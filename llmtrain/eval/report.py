"""Evaluation reports: eval.json (everything), eval.md (a short Markdown summary), a console table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["format_value", "markdown_report", "metric_items", "print_table", "write_reports"]


def format_value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:.4f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out


def metric_items(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """The scalar metrics of an eval.json dict: its "task/metric" keys."""
    return [(k, v) for k, v in results.items() if "/" in k]


def markdown_report(results: dict[str, Any]) -> str:
    """Metrics table, then per task: per-class scores and confusion matrix, a few sample generations."""
    lines = [
        "# Evaluation",
        "",
        f"- checkpoint: `{results.get('checkpoint')}`",
        f"- tasks: {', '.join(results.get('tasks', []))}",
        "",
    ]
    lines += _md_table(["metric", "value"], [[k, format_value(v)] for k, v in metric_items(results)])
    for task, det in results.get("details", {}).items():
        if not isinstance(det, dict):
            continue
        per_class, cm = det.get("per_class"), det.get("confusion_matrix")
        if isinstance(per_class, dict) and per_class:
            lines += ["", f"## {task}: per class", ""]
            lines += _md_table(
                ["class", "precision", "recall", "f1", "support"],
                [
                    [
                        name,
                        *(format_value(s.get(k, math.nan)) for k in ("precision", "recall", "f1")),
                        format_value(s.get("support", 0)),
                    ]
                    for name, s in per_class.items()
                ],
            )
        if isinstance(cm, list) and cm:
            names = det.get("labels") or [str(i) for i in range(len(cm))]
            lines += ["", f"## {task}: confusion matrix (rows: true, columns: predicted)", ""]
            lines += _md_table(["", *names], [[names[i], *(str(c) for c in row)] for i, row in enumerate(cm)])
        samples = det.get("samples")
        if isinstance(samples, list) and samples:
            lines += ["", f"## {task}: samples", ""]
            for s in samples[:3]:
                lines += [
                    f"- prompt: `{s['prompt'][-200:]!r}`",
                    f"  - generated: `{s['generated'][:300]!r}`",
                    f"  - reference: `{s['references'][0][:300]!r}`",
                ]
    return "\n".join(lines) + "\n"


def print_table(metrics: dict[str, Any], title: str | None = None) -> None:
    """A two-column table on stdout (rich when installed, plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        width = max((len(k) for k in metrics), default=0)
        if title:
            print(title)
        for k, v in metrics.items():
            print(f"{k:<{width}}  {format_value(v)}")
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(escape(k), escape(format_value(v)))  # class names like "[ham]" are not markup
    Console(width=max(80, max((len(k) for k in metrics), default=0) + 30)).print(table)


def write_reports(run_dir: Path, results: dict[str, Any]) -> None:
    """eval.json and eval.md, each written to a temporary name and renamed (never half-written)."""
    from llmtrain.files import atomic_write

    atomic_write(run_dir / "eval.json", json.dumps(results, indent=2, default=str))
    atomic_write(run_dir / "eval.md", markdown_report(results))
