"""Shared fixtures: run the real CLI in a subprocess, and one tiny pretrained checkpoint."""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The real datasets, beside the repository; LLMTRAIN_TEST_DATA names them elsewhere (e.g. from a git worktree).
SHARED = Path(os.environ.get("LLMTRAIN_TEST_DATA") or ROOT.parent / "shared" / "data")

# Small and fast: a 2-layer GPT on short windows, evaluated on a few validation batches.
TINY = [
    "model=gpt_tiny",
    "data.seq_len=32",
    "data.batch_size=8",
    "trainer.eval_batches=8",
    "trainer.progress=false",
    "trainer.log_every=5",
]


# Prepared-data and tokenizer caches go to a temporary directory, never the user's ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="llmtrain-test-cache-")
os.environ.setdefault("LLMTRAIN_CACHE_DIR", _CACHE)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    if cwd is None:  # from the repository root: keep outputs out of it
        args = _with_output_dir(list(args))
    return subprocess.run(
        [sys.executable, "-m", "llmtrain", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def _with_output_dir(args: list[str]) -> list[str]:
    """A Hydra stage run from the repository without an explicit output directory gets a fresh
    temporary one, so tests never write into the repository."""
    if not args or args[0] in ("--help", "plot") or any(a in ("--help", "--cfg", "-c", "--info") for a in args):
        return args  # nothing is written
    multirun = any(a in ("-m", "--multirun") for a in args)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(a.startswith(key + "=") for a in args):
        return args
    return [*args, f"{key}={tempfile.mkdtemp(prefix='llmtrain-test-out-')}"]


def sst2_split(directory: Path) -> tuple[Path, Path]:
    """A small SST-2 classification set: 100 training and 40 validation sentences of the dev
    file (header row kept), as DIR/train.tsv and DIR/dev.tsv."""
    lines = (SHARED / "sst2" / "dev.tsv").read_text().splitlines()
    train, dev = directory / "train.tsv", directory / "dev.tsv"
    train.write_text("\n".join(lines[:1] + lines[41:141]) + "\n")
    dev.write_text("\n".join(lines[:41]) + "\n")
    return train, dev


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one line on stderr that mentions the key/file, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A run directory with a checkpoint of a tiny GPT trained for 60 steps on Shakespeare."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    proc = run_cli(
        "pretrain",
        *TINY,
        "trainer.max_steps=60",
        "trainer.eval_every=30",
        "optim.lr=3e-3",
        "scheduler.warmup_steps=10",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


# ----------------------------------------------------------------------------- the `slow` marker
# A test that starts the CLI in a subprocess is `slow` (`make test-fast` skips those). Found from
# the source, so test files need no decorators: a name "runs the CLI" if it is run_cli or
# subprocess, or a function (test, helper or fixture) that mentions such a name or takes such a
# fixture; helpers imported from sibling modules (conftest, golden_losses) are followed.
CLI_SEEDS = frozenset({"run_cli", "subprocess"})


@functools.lru_cache(maxsize=None)
def cli_running_names(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    slow = set(CLI_SEEDS)
    for node in ast.walk(tree):
        dep = path.parent / f"{node.module}.py" if isinstance(node, ast.ImportFrom) and node.module else None
        if dep is not None and node.level == 0 and dep.is_file() and dep != path:
            slow |= {a.asname or a.name for a in node.names if a.name in cli_running_names(dep)}
    uses: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {a.arg for a in args}
            uses.setdefault(node.name, set()).update(names)
    changed = True
    while changed:  # to a fixed point: a helper of a helper of run_cli runs the CLI too
        changed = False
        for name, names in uses.items():
            if name not in slow and names & slow:
                slow.add(name)
                changed = True
    return frozenset(slow)


def pytest_collection_modifyitems(config, items):
    shared_fixtures = cli_running_names(Path(__file__).resolve())
    for item in items:
        names = cli_running_names(Path(item.path).resolve()) | shared_fixtures
        test_name = getattr(item, "originalname", item.name)  # without the [param] suffix
        if test_name in names or names.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)
