"""Hydra glue: compose a stage's config once, and run the job on that composed config.

A single run is composed exactly once: the CLI validates the result (bad input exits 2 before
anything is written), a `trainer.devices=N` parent hands the same config to its workers in a
file (`COMPOSED_ENV`), and the job runs through Hydra's own `run_job` (output directory,
logging, HydraConfig) on it. Sweeps (-m) go through `hydra.main`, whose launcher composes each
job; the CLI validates the sweep's first values beforehand with `compose_run` as well.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from llmtrain.config import CONF_DIR, to_run_config, validate_config
from llmtrain.config.schema import RunConfig
from llmtrain.config.unknown_keys import check_known_keys
from llmtrain.errors import UserError

# Set by the `trainer.devices=N` parent for its workers: the path of the composed config.
COMPOSED_ENV = "LLMTRAIN_COMPOSED_CONFIG"


@contextlib.contextmanager
def hydra_session(job_name: str) -> Iterator[None]:
    """Hydra initialised on the package's conf/ (what hydra.main would set up)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job_name):
            yield
    finally:
        GlobalHydra.instance().clear()


def compose_run(config_name: str, overrides: list[str]) -> DictConfig:
    """The job's config with its `hydra` node; call inside `hydra_session`."""
    from hydra import compose

    return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def sweep_first_values(overrides: list[str]) -> list[str]:
    """The overrides with each sweep (a,b or choice(...)) replaced by its first value, for checking
    a sweep before it starts; sweeps without one (interval(...)) and Hydra's own keys are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for bad syntax
        raise UserError(f"bad override: {' '.join(str(e).split())}") from None
    single: list[str] = []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            try:
                first = next(iter(o.sweep_string_iterator()))
            except Exception:  # noqa: BLE001 - interval()/tag sweeps have no first value
                continue
            single.append(f"{o.get_key_element()}={first}")
        else:
            single.append(o.input_line)
    return single


def job_config(cfg: DictConfig) -> DictConfig:
    """`cfg` without the `hydra` node: what the task function receives."""
    job = copy.deepcopy(cfg)
    with read_write(job), open_dict(job):
        job.pop("hydra", None)
    return job


def validate(cfg: DictConfig) -> RunConfig:
    """Unknown keys, types (while converting to the schema) and the semantic checks of
    `validate_config`."""
    job = job_config(cfg)
    check_known_keys(job)
    run_cfg = to_run_config(job)
    validate_config(run_cfg)
    return run_cfg


def save_composed(cfg: DictConfig, path: Path) -> None:
    from llmtrain.files import atomic_write

    atomic_write(path, OmegaConf.to_yaml(cfg))


def load_composed(path: str | os.PathLike) -> DictConfig:
    """A config written by `save_composed`, typed by the schema again (a YAML file is untyped)."""
    from hydra.conf import HydraConf

    raw = OmegaConf.load(path)
    assert isinstance(raw, DictConfig)
    hydra_node = raw.pop("hydra")
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
    hydra_cfg = OmegaConf.structured(HydraConf)
    OmegaConf.set_struct(hydra_cfg, False)  # launcher/sweeper nodes are not in HydraConf itself
    with open_dict(cfg):
        cfg.hydra = OmegaConf.merge(hydra_cfg, hydra_node)
    return cfg


def run_composed(task: Callable[[DictConfig], Any], cfg: DictConfig, *, configure_logging: bool = True) -> Any:
    """Run `task` as a Hydra job on an already composed config (call inside `hydra_session`)."""
    from hydra._internal.callbacks import Callbacks  # Hydra's own run path uses the same class
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext

    context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(cfg))
    ret = run_job(
        task_function=task,
        config=cfg,
        job_dir_key="hydra.run.dir",
        job_subdir_key=None,
        hydra_context=context,
        configure_logging=configure_logging,
    )
    return ret.return_value  # re-raises the task's exception, as hydra.main does
