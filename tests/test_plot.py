"""Tests for llmtrain.eval.plot: fake run directories in, a valid PNG out."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import pytest

from llmtrain.errors import UserError
from llmtrain.eval.plot import plot_runs, read_metrics, run_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, name: str, overrides: list[str] | None, lr: float, steps: int = 50) -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append(
            {
                "step": step,
                "train/loss": 4.0 * math.exp(-step / 20) + 1.0,
                "train/lr": lr * min(1.0, step / 10),
                "train/tokens_per_s": 1000.0 + 10 * (step % 7),
                "train/tokens": step * 2048,
            }
        )
        if step % 10 == 0:
            lines.append({"step": step, "val/loss": 4.2 * math.exp(-step / 20) + 1.1})
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    (run / "metrics.jsonl").write_text(text + '{"step": 51, "train/lo')  # truncated last line
    if overrides is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run


def _check_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # four panels with curves, not an empty canvas


def test_plot_two_runs(tmp_path):
    a = fake_run(tmp_path, "run_a", ["optim.lr=1e-3", "model=gpt2"], lr=1e-3)
    b = fake_run(tmp_path, "run_b", ["optim.lr=3e-4"], lr=3e-4)
    out = plot_runs([a, b], tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    _check_png(out)


def test_plot_with_explicit_labels_and_single_run(tmp_path):
    a = fake_run(tmp_path, "run_a", None, lr=1e-3)
    out = plot_runs([a], tmp_path / "one.png", labels=["baseline"])
    _check_png(out)
    with pytest.raises(UserError):
        plot_runs([a], tmp_path / "two.png", labels=["x", "y"])


def test_default_labels(tmp_path):
    a = fake_run(tmp_path, "run_a", ["optim.lr=1e-3", "model=gpt2"], lr=1e-3)
    b = fake_run(tmp_path, "run_b", None, lr=1e-3)
    c = fake_run(tmp_path, "run_c", [], lr=1e-3)
    assert run_label(a) == "optim.lr=1e-3 model=gpt2"
    assert run_label(b) == "run_b"
    assert run_label(c) == "run_c"


def test_read_metrics_skips_truncated_line(tmp_path):
    run = fake_run(tmp_path, "r", None, lr=1e-3, steps=20)
    recs = read_metrics(run)
    assert len(recs) == 20 + 2
    assert all("step" in r for r in recs)


def test_missing_metrics_file_raises_user_error(tmp_path):
    good = fake_run(tmp_path, "good", None, lr=1e-3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="metrics.jsonl"):
        plot_runs([good, empty], tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_missing_matplotlib_is_one_line_import_error(tmp_path, monkeypatch):
    run = fake_run(tmp_path, "r", None, lr=1e-3, steps=5)
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="matplotlib") as info:
        plot_runs([run], tmp_path / "x.png")
    assert "\n" not in str(info.value)
