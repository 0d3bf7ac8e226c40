"""llmtrain installs like a real package: a wheel carries conf/, and its CLI, installed into a fresh
venv and run from an empty directory, composes an experiment and writes a checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, assert_user_error, run_cli


def _run(cmd: list, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH (tests are often run with the checkout on it) or LLMTRAIN_CONF would hide the
    # installed package behind the source tree.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLMTRAIN_CONF")}
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources, so no build/ or stale egg-info of the checkout is used."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "llmtrain", src / "llmtrain", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src])
    (whl,) = out.glob("llmtrain-*.whl")
    return whl


def test_wheel_ships_the_config_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llmtrain/conf/pretrain.yaml" in names
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("llmtrain/conf/experiment/")}
    in_tree = {p.name for p in (ROOT / "llmtrain" / "conf" / "experiment").glob("*.yaml")}
    assert "gpt_small.yaml" in in_tree and shipped == in_tree
    assert {
        "llmtrain/conf/model/gpt_small.yaml",
        "llmtrain/conf/task/classification.yaml",
        "llmtrain/assets/tinyshakespeare.txt.gz",
    } <= names


def test_no_shipped_preset_points_into_the_repository():
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "llmtrain" / "conf").rglob("*.yaml") if "../shared" in p.read_text()
    ]
    assert not offenders


@pytest.mark.parametrize(
    "args, key",
    [
        (["finetune", "+experiment=finetune_sst2", "init_from=RUN"], "task.train_path is required"),
        (["finetune", "+experiment=qa_squad", "init_from=RUN"], "task.train_path is required"),
        (["finetune", "+experiment=finetune_wikitext", "init_from=RUN"], "data.path is required"),
        (["pretrain", "+experiment=bert_small"], "data.path is required"),
        (["pretrain", "optim.lr=???"], "optim.lr is required"),  # OmegaConf's MissingMandatoryValue
    ],
)
def test_a_missing_required_key_is_one_line_and_writes_nothing(args, key, tmp_path):
    assert_user_error(run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}"), key)
    assert not (tmp_path / "run").exists()


def test_installed_wheel_pretrains_from_an_empty_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir])
    python = env_dir / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # Dependencies (torch, hydra, ...) come from the dev venv. A path line does not run that
    # directory's own .pth files, so the dev venv's editable llmtrain stays out of sight.
    (site / "dev_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel])

    work = tmp_path / "empty"
    work.mkdir()
    where = _run([python, "-c", "import llmtrain.config as c; print(c.__file__); print(c.CONF_DIR)"], cwd=work)
    assert all(Path(p).is_relative_to(site / "llmtrain") for p in where.stdout.split()), (where.stdout, site)
    assert not any(work.iterdir())

    proc = _run(
        [
            env_dir / "bin" / "llmtrain",
            "pretrain",
            "+experiment=gpt_small",
            "trainer.max_steps=5",
            "trainer.eval_every=5",
            "trainer.eval_batches=2",
            "trainer.progress=false",
        ],
        cwd=work,
    )
    ckpts = list(work.glob("outputs/pretrain/*/*/checkpoints/step_0000005/model.safetensors"))
    assert len(ckpts) == 1, (sorted(p.relative_to(work) for p in work.rglob("*")), proc.stdout[-2000:])
