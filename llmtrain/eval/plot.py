"""Plot training curves of one or more runs from their metrics.jsonl files.

Each line of RUN_DIR/metrics.jsonl is a JSON object with a `step`; training lines carry
train/loss, train/lr, train/tokens_per_s and train/tokens (cumulative), eval lines val/loss.
One PNG with four panels: loss vs step (train solid, val dashed), loss vs tokens seen, learning
rate vs step and throughput vs step. RL runs (`llmtrain rl`, with train/reward) get reward, KL,
held-out exact match (or the loss) and response length instead. Several runs overlay, one
colour each.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional, Union

from llmtrain.errors import UserError
from llmtrain.train.tracking import METRICS_FILE, read_records

__all__ = ["plot_runs", "read_metrics", "run_label"]

PathLike = Union[str, Path]


def read_metrics(run_dir: PathLike) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, in file order. Blank lines and a truncated
    (unparseable) line, e.g. from a run killed mid-write, are skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"no metrics file {path} (is {run_dir} a run directory?)")
    return [rec for rec in read_records(path) if "step" in rec]


def run_label(run_dir: PathLike) -> str:
    """The run's overrides (RUN_DIR/overrides.yaml, written by llmtrain, or Hydra's
    RUN_DIR/.hydra/overrides.yaml) joined with spaces, or the directory name when there are none."""
    run_dir = Path(run_dir)
    path = run_dir / "overrides.yaml"
    if not path.is_file():
        path = run_dir / ".hydra" / "overrides.yaml"
    name = run_dir.resolve().name or str(run_dir)
    if not path.is_file():
        return name
    try:
        import yaml

        overrides = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - an unreadable overrides file only costs the label
        return name
    if isinstance(overrides, list) and overrides:
        return " ".join(str(o) for o in overrides)
    return name


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, sorted by step. A step logged twice (a resumed run repeats
    the steps after its last checkpoint) keeps its latest value."""
    by_step: dict[float, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _tokens_at(steps: list[float], token_steps: list[float], tokens: list[float]) -> list[Optional[float]]:
    """Tokens seen at each of `steps`, from the latest training record at or before it."""
    import bisect

    out: list[Optional[float]] = []
    for s in steps:
        i = bisect.bisect_right(token_steps, s) - 1
        out.append(tokens[i] if i >= 0 else None)
    return out


def _kind(label: str, kind: str) -> str:
    return f"{label} ({kind})" if label else kind


def short_labels(labels: list[str], run_dirs: list[Path]) -> tuple[list[str], str]:
    """Legends keep only the overrides that differ between runs; the shared ones become the
    figure title (a long override list in every legend entry would squeeze the axes away)."""
    parts = [label.split(" ") for label in labels]
    common = [p for p in parts[0] if all(p in q for q in parts[1:])] if len(parts) > 1 else parts[0]
    short = [" ".join(p for p in q if p not in common) for q in parts]
    if len(parts) == 1:  # one run: its overrides are the title, the legend says train / val
        return [""], labels[0]
    return [s or Path(d).name for s, d in zip(short, run_dirs)], " ".join(common)


def plot_runs(run_dirs: list[Path], out: Path, labels: Optional[list[str]] = None) -> Path:
    """Draw the training curves of `run_dirs` into the PNG `out` (parent folders are created)
    and return its path. labels default to each run's Hydra overrides (see run_label)."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise UserError("plot: no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"plot: {len(labels)} labels for {len(run_dirs)} run directories")
    runs = [read_metrics(d) for d in run_dirs]  # fail on a missing file before importing
    title = ""
    if labels is None:
        labels, title = short_labels([run_label(d) for d in run_dirs], run_dirs)
    labels = list(labels)

    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or 'llmtrain[plot]')") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    if any("train/reward" in r for records in runs for r in records):
        _plot_rl(axes, runs, labels)
        return _save(fig, plt, out, title)
    ax_step, ax_tok, ax_lr, ax_tps = axes.flat
    for i, (records, label) in enumerate(zip(runs, labels)):
        color = f"C{i % 10}"
        tr_steps, tr_loss = _series(records, "train/loss")
        va_steps, va_loss = _series(records, "val/loss")
        tok_steps, tokens = _series(records, "train/tokens")
        lr_steps, lr = _series(records, "train/lr")
        tps_steps, tps = _series(records, "train/tokens_per_s")

        if tr_steps:
            ax_step.plot(tr_steps, tr_loss, color=color, lw=1.2, label=_kind(label, "train"))
        if va_steps:
            ax_step.plot(va_steps, va_loss, color=color, ls="--", marker="o", ms=3, label=_kind(label, "val"))
        if tok_steps:
            tr_tok = _tokens_at(tr_steps, tok_steps, tokens)
            pts = [(t, v) for t, v in zip(tr_tok, tr_loss) if t is not None]
            if pts:
                ax_tok.plot(*zip(*pts), color=color, lw=1.2, label=_kind(label, "train"))
            va_tok = _tokens_at(va_steps, tok_steps, tokens)
            pts = [(t, v) for t, v in zip(va_tok, va_loss) if t is not None]
            if pts:
                ax_tok.plot(*zip(*pts), color=color, ls="--", marker="o", ms=3, label=_kind(label, "val"))
        if lr_steps:
            ax_lr.plot(lr_steps, lr, color=color, lw=1.2, label=label or None)
        if tps_steps:
            ax_tps.plot(tps_steps, tps, color=color, lw=1.0, label=label or None)

    ax_step.set(title="loss vs step", xlabel="step", ylabel="loss")
    ax_tok.set(title="loss vs tokens seen", xlabel="tokens", ylabel="loss")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    ax_tps.set(title="throughput", xlabel="step", ylabel="tokens/s")
    return _save(fig, plt, out, title)


# RL panels: (title, y label, train key, val key); a key None draws nothing.
RL_PANELS = [
    ("reward", "mean reward", "train/reward", "val/reward"),
    ("KL to the reference (k3)", "KL / token", "train/kl", "val/kl"),
    ("held-out exact match", "exact match", None, "val/exact_match"),
    ("response length", "tokens", "train/response_len", "val/response_len"),
]


def _plot_rl(axes, runs: list[list[dict]], labels: list[str]) -> None:
    has_em = any("val/exact_match" in r for records in runs for r in records)
    panels = RL_PANELS if has_em else [*RL_PANELS[:2], ("loss", "GRPO loss", "train/loss", None), RL_PANELS[3]]
    for ax, (title, ylabel, train_key, val_key) in zip(axes.flat, panels):
        for i, (records, label) in enumerate(zip(runs, labels)):
            color = f"C{i % 10}"
            if train_key:
                steps, values = _series(records, train_key)
                if steps:
                    ax.plot(steps, values, color=color, lw=1.2, label=_kind(label, "train"))
            if val_key:
                steps, values = _series(records, val_key)
                if steps:
                    ax.plot(steps, values, color=color, ls="--", marker="o", ms=3, label=_kind(label, "val"))
        ax.set(title=title, xlabel="step", ylabel=ylabel)


def _save(fig, plt, out: PathLike, title: str) -> Path:
    axes = fig.axes
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(textwrap.fill(title, 160), fontsize=8)
    fig.tight_layout()

    import io

    from llmtrain.files import atomic_write

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # rendered in memory, then written like every other file (atomic, fsynced)
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write(out, buf.getvalue())
    return out
