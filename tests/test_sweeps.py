"""Sweeps (-m grid, Optuna), the end-of-sweep summary, failing jobs, run records and trackers."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_user_error, run_cli

# A few steps of a 2-layer GPT: each job takes well under a second.
FAST = [
    "model=gpt_tiny",
    "data.seq_len=32",
    "data.batch_size=4",
    "trainer.max_steps=3",
    "trainer.eval_batches=2",
    "trainer.progress=false",
]
ASSET = "${asset:tinyshakespeare.txt.gz}"


def _last_val(job: Path, key: str = "val/loss") -> float:
    """Independent of llmtrain.sweep: the last value of `key` in a job's metrics.jsonl."""
    values = [r[key] for r in map(json.loads, (job / "metrics.jsonl").read_text().splitlines()) if key in r]
    return float(values[-1])


def _summary(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_grid_sweep_runs_every_combination_and_marks_the_best(tmp_path):
    sweep = tmp_path / "grid"
    proc = run_cli("pretrain", "-m", *FAST, "optim.lr=3e-3,1e-4", "model.n_layer=1,2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    combos = set()
    for job in jobs:
        for f in ("config.yaml", "overrides.yaml", "run_info.json", "metrics.jsonl", "status.json"):
            assert (job / f).is_file(), (job, f)
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        combos.add((cfg["optim"]["lr"], cfg["model"]["n_layer"]))
        assert any(o.startswith("optim.lr=") for o in yaml.safe_load((job / "overrides.yaml").read_text()))
    assert combos == set(itertools.product([3e-3, 1e-4], [1, 2]))

    rows = _summary(sweep)
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    losses = {r["job"]: _last_val(sweep / r["job"]) for r in rows}
    for r in rows:
        assert float(r["val/loss"]) == pytest.approx(losses[r["job"]])
        assert r["optim.lr"] and r["model.n_layer"]  # the swept keys are columns
        assert "trainer.max_steps" not in r  # shared overrides are not
    assert [r["job"] for r in rows if r["best"] == "*"] == [min(losses, key=losses.get)]
    assert (sweep / "summary.md").read_text().count("| completed |") == 4
    assert "sweep summary: 4 jobs, 0 failed" in proc.stdout

    info = json.loads((jobs[0] / "run_info.json").read_text())
    assert info["packages"]["hydra-core"] == version("hydra-core")
    assert info["packages"]["omegaconf"] == version("omegaconf")
    assert info["packages"]["torch"] == version("torch")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert info["git_commit"] == head.stdout.strip()


def test_optuna_search_runs_trials_in_the_search_space(tmp_path):
    sweep = tmp_path / "optuna"
    proc = run_cli(
        "pretrain",
        "-m",
        "+hparams_search=optuna",
        *FAST,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1", "2"]
    lrs = set()
    for job in jobs:
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert 1e-4 <= cfg["optim"]["lr"] <= 1e-2
        assert 0.0 <= cfg["optim"]["weight_decay"] <= 0.2 and 0.0 <= cfg["model"]["dropout"] <= 0.2
        lrs.add(cfg["optim"]["lr"])
    assert len(lrs) == 3  # sampled, not fixed
    losses = {j.name: _last_val(j) for j in jobs}
    # Optuna saw the value each job returned: its best is the lowest validation loss.
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(losses.values()))
    rows = _summary(sweep)
    assert len(rows) == 3 and {"optim.lr", "optim.weight_decay", "model.dropout"} <= set(rows[0])
    assert [r["job"] for r in rows if r["best"] == "*"] == [min(losses, key=losses.get)]


def _rdb_storage_works() -> bool:
    # optuna 2.x (what hydra-optuna-sweeper 1.x allows) cannot use SQLAlchemy 2 for its storage.
    return int(version("optuna").split(".")[0]) >= 3 or int(version("sqlalchemy").split(".")[0]) < 2


@pytest.mark.skipif(not _rdb_storage_works(), reason="optuna 2.x RDB storage needs sqlalchemy<2")
def test_optuna_study_continues_from_its_storage(tmp_path):
    db = f"sqlite:///{tmp_path / 'study.db'}"
    for i, seed in enumerate((1, 2)):  # a new seed, or the continued study repeats its random trials
        proc = run_cli(
            "pretrain",
            "-m",
            "+hparams_search=optuna",
            *FAST,
            "hydra.sweeper.n_trials=1",
            f"hydra.sweeper.storage={db}",
            "hydra.sweeper.study_name=cont",
            f"hydra.sweeper.sampler.seed={seed}",
            f"hydra.sweep.dir={tmp_path / str(i)}",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="cont", storage=db)
    assert len(study.trials) == 2
    assert study.best_value == pytest.approx(min(_last_val(tmp_path / str(i) / "0") for i in (0, 1)))


@pytest.mark.skipif(_rdb_storage_works(), reason="the storage works here")
def test_optuna_storage_that_cannot_work_is_one_line(tmp_path):
    proc = run_cli(
        "pretrain",
        "-m",
        "+hparams_search=optuna",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/s.db",
        f"hydra.sweep.dir={tmp_path / 'sw'}",
    )
    assert_user_error(proc, "sqlalchemy<2")


def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "failing"
    missing = tmp_path / "missing.txt"
    proc = run_cli(
        "pretrain", "-m", *FAST, f"data.path={missing},{ASSET}", "logger=tensorboard", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    failed, ok = sweep / "0", sweep / "1"
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and str(missing) in status["error"]
    assert str(missing) in (failed / "error.txt").read_text()
    assert sum(str(missing) in ln and ln.startswith("error: job 0") for ln in proc.stderr.splitlines()) == 1
    assert json.loads((ok / "status.json").read_text())["status"] == "completed"

    rows = {r["job"]: r for r in _summary(sweep)}
    assert rows["0"]["status"] == "failed" and str(missing) in rows["0"]["error"] and rows["0"]["best"] == ""
    assert rows["1"]["status"] == "completed" and rows["1"]["best"] == "*"

    # logger=tensorboard: event files whose scalars match metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((ok / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(ok / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(_last_val(ok), rel=1e-6)

    # The same bad input outside a sweep still exits 2 with one line.
    single = run_cli("pretrain", *FAST, f"data.path={missing}", f"hydra.run.dir={tmp_path / 'single'}")
    assert_user_error(single, str(missing))


def test_wandb_offline_run_keeps_its_files_in_the_run_dir(tmp_path):
    sweep = tmp_path / "wb"
    # An unreachable server: offline mode must neither need nor wait for the network.
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
    }
    proc = run_cli(
        "pretrain",
        "-m",
        *FAST,
        "logger=wandb",
        "logger.tags=[smoke]",
        "optim.lr=1e-3",
        f"hydra.sweep.dir={sweep}",
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = sweep / "0"
    runs = list((job / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((job / "wandb").iterdir()) if (job / "wandb").exists() else proc.stdout
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    # The run log holds the metrics under metrics.jsonl's names, the config with run_info, the
    # sweep as group and the tags (strings are stored verbatim in wandb's protobuf records).
    for needle in ("val/loss", "train/loss", "git_commit", "hydra-core", str(sweep), "smoke"):
        assert needle.encode() in data, needle
    assert json.loads((job / "status.json").read_text())["status"] == "completed"


def test_wandb_missing_or_bad_mode_is_one_line(tmp_path, monkeypatch):
    from llmtrain.config.schema import LoggerConfig
    from llmtrain.errors import UserError
    from llmtrain.train.tracking import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLogger(tmp_path, LoggerConfig(name="wandb", mode="offline"))
    with pytest.raises(UserError, match="logger.mode"):
        MetricsLogger(tmp_path, LoggerConfig(name="wandb", mode="sometimes"))
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened before the tracker is ready


def test_slurm_launcher_without_plugin_is_one_line(tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        pytest.skip("hydra-submitit-launcher is installed")
    proc = run_cli("pretrain", "-m", "hydra/launcher=slurm", "optim.lr=1e-3,3e-4", f"hydra.sweep.dir={tmp_path}/s")
    assert_user_error(proc, "pip install hydra-submitit-launcher")
    assert not (tmp_path / "s").exists()


def _fake_job(sweep: Path, num: int, status: dict | None, records: list[dict]) -> None:
    job = sweep / str(num)
    job.mkdir(parents=True)
    if status is not None:
        (job / "status.json").write_text(json.dumps(status))
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_maximizes_accuracy_and_skips_failed_and_nan(tmp_path):
    from llmtrain.sweep.summary import write_summary

    ov = lambda lr: ["model=gpt_tiny", f"optim.lr={lr}"]  # noqa: E731
    _fake_job(
        tmp_path,
        0,
        {"status": "completed", "overrides": ov(1), "value": 0.7, "metric": "val/accuracy"},
        [{"step": 5, "val/accuracy": 0.7, "val/loss": 1.0}],
    )
    _fake_job(
        tmp_path,
        1,
        {"status": "completed", "overrides": ov(2), "value": 0.9, "metric": "val/accuracy"},
        [{"step": 5, "val/accuracy": 0.9, "val/loss": 2.0}],
    )
    _fake_job(
        tmp_path,
        2,
        {"status": "completed", "overrides": ov(3), "value": "nan", "metric": "val/accuracy"},
        [{"step": 5, "val/accuracy": "nan"}],
    )
    _fake_job(tmp_path, 3, {"status": "failed", "overrides": ov(4), "value": None, "error": "boom"}, [])
    _fake_job(tmp_path, 10, None, [{"step": 1, "train/loss": 3.0}])  # killed: no status
    (tmp_path / "10" / "overrides.yaml").write_text(yaml.safe_dump(ov(5)))  # overrides from here then

    summary = write_summary(tmp_path, "val/accuracy")
    assert summary is not None and summary.direction == "maximize"
    rows = _summary(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10"]  # numeric order
    assert [r["job"] for r in rows if r["best"] == "*"] == ["1"]
    assert rows[3]["status"] == "failed" and rows[3]["error"] == "boom"
    assert rows[4]["status"] == "incomplete" and rows[4]["optim.lr"] == "5"
    assert math.isnan(float(rows[2]["val/accuracy"]))
    assert summary.fixed == {"model": "gpt_tiny"} and summary.varying == ["optim.lr"]


def test_sweeper_always_gets_a_float(monkeypatch):
    from llmtrain.sweep import job

    monkeypatch.setattr(job, "hydra_job", lambda: None)
    assert job.objective_value(1.5, "val/loss") == 1.5
    assert job.objective_value(None, "val/loss") == math.inf
    assert job.objective_value(float("nan"), "val/loss") == math.inf
    assert job.objective_value(float("nan"), "val/accuracy") == -math.inf
    # The sweeper's own direction wins over the metric's name (Optuna: hydra.sweeper.direction).
    from omegaconf import OmegaConf

    assert job.direction("val/loss", OmegaConf.create({"sweeper": {"direction": "maximize"}})) == "maximize"
    assert job.direction("val/accuracy", OmegaConf.create({"sweeper": {"n_jobs": 1}})) == "maximize"


def test_sigterm_records_the_job_as_interrupted_and_stops_the_sweep(tmp_path):
    import os
    import signal
    import time

    from llmtrain.sweep.summary import write_summary

    sweep = tmp_path / "sweep"
    args = [*FAST, "trainer.max_steps=100000", "trainer.log_every=1", "optim.lr=3e-3,1e-3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    p = subprocess.Popen(
        [sys.executable, "-m", "llmtrain", "pretrain", "-m", *args, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, t0 = sweep / "0" / "metrics.jsonl", time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    status = json.loads((sweep / "0" / "status.json").read_text())
    assert status["status"] == "interrupted" and "resume with trainer.resume=auto" in status["error"]
    assert not (sweep / "1").exists()  # the signal stopped the sweep, not just the job
    summary = write_summary(sweep)
    assert summary is not None and summary.best is None  # an interrupted job never ranks as best
    assert _summary(sweep)[0]["status"] == "interrupted"
    assert "1 jobs, 0 failed, 1 interrupted" in summary.text()
