"""Config checks before any work, in process: unknown `+key`s (item 9), value ranges and the
corpus size (item 10), the CPU thread count (item 12)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llmtrain.config import register_configs
from llmtrain.config.compose import compose_run, hydra_session, sweep_first_values, validate
from llmtrain.config.ranges import RANGES, Range
from llmtrain.config.unknown_keys import schema_class, with_suggestion
from llmtrain.data.loader import PackedWindows, min_train_tokens
from llmtrain.errors import UserError
from llmtrain.threads import apply_threads, resolve_threads

register_configs()


def _check(stage: str, *overrides: str):
    with hydra_session(stage):
        return validate(compose_run(stage, list(overrides)))


def _refused(stage: str, *overrides: str) -> str:
    with pytest.raises(UserError) as e:
        _check(stage, *overrides)
    return str(e.value)


# ----------------------------------------------------------------------------- item 9: unknown keys
@pytest.mark.parametrize("prefix", ["+", "++"])
def test_added_unknown_key_is_refused_with_a_suggestion(prefix):
    msg = _refused("pretrain", f"{prefix}optim.lrr=1")
    assert "'optim.lrr'" in msg and "did you mean 'optim.lr'?" in msg
    assert "'finetune.lora.r'" in _refused("pretrain", f"{prefix}finetune.lora.rr=2")
    assert "'foo'" in _refused("pretrain", f"{prefix}foo=1")  # the root is typed too


def test_added_key_to_task_is_refused():
    msg = _refused("finetune", "task=classification", "task.train_path=x.tsv", "+task.header=false")
    assert "unknown key 'task.header'" in msg


def test_open_and_hydra_keys_still_compose():
    assert _check("pretrain", "++optim.lr=0.5").optim.lr == 0.5  # ++ on a known key sets it
    assert _check("pretrain", "logger=wandb", "logger.tags=[a,b]").logger.tags == ["a", "b"]
    _check("pretrain", "+hparams_search=optuna")  # sweeper params live under hydra.*
    _check("pretrain", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+hydra.job.env_set.X=1")


def test_sweep_is_checked_with_its_first_value():
    assert "optim.lrr" in _refused("pretrain", *sweep_first_values(["+optim.lrr=1,2"]))


def test_misspelled_plain_key_gets_a_suggestion():
    line = "Could not override 'optim.lrr'.: Key 'lrr' not in 'OptimConfig' (key: optim.lrr)"
    assert with_suggestion(line).endswith("(did you mean 'optim.lr'?)")
    typed = "Could not override 'trainer.max_steps'.: Value 'abc' of type 'str' could not be converted"
    assert with_suggestion(typed) == typed


# ----------------------------------------------------------------------------- item 10: ranges
@pytest.mark.parametrize(
    "stage, override, needle",
    [
        ("pretrain", "optim.lr=-1", "optim.lr must be >= 0, got -1.0"),
        ("pretrain", "optim.beta1=1", "optim.beta1 must be in [0, 1), got 1.0"),
        ("pretrain", "optim.beta2=1.5", "optim.beta2 must be in [0, 1)"),
        ("pretrain", "model.dropout=1", "model.dropout must be in [0, 1)"),
        ("pretrain", "model.dropout=-0.1", "model.dropout must be in [0, 1)"),
        ("generate", "generate.max_new_tokens=-1", "generate.max_new_tokens must be >= 0"),
        ("chat", "chat.max_new_tokens=-1", "chat.max_new_tokens must be >= 0"),
        ("evaluate", "eval.max_new_tokens=-1", "eval.max_new_tokens must be >= 0"),
        ("pretrain", "trainer.eval_every=-1", "trainer.eval_every must be >= 0"),
        ("pretrain", "trainer.ckpt_every=-1", "trainer.ckpt_every must be >= 0"),
        ("pretrain", "trainer.keep_last=-1", "trainer.keep_last must be >= 0"),
        ("pretrain", "trainer.eval_batches=-1", "trainer.eval_batches must be >= 0"),
        ("pretrain", "scheduler.warmup_steps=-1", "scheduler.warmup_steps must be >= 0"),
        ("pretrain", "optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
        ("pretrain", "trainer.max_bad_steps=-1", "trainer.max_bad_steps must be >= 0"),
        ("pretrain", "model.n_head=0", "model.n_head must be >= 1, got 0"),
        ("pretrain", "data.batch_size=0", "data.batch_size must be >= 1"),
        ("pretrain", "trainer.grad_accum=0", "trainer.grad_accum must be >= 1"),
        ("pretrain", "trainer.max_steps=0", "trainer.max_steps must be >= 1"),
        ("pretrain", "trainer.threads=-1", "trainer.threads must be >= 0"),
        ("pretrain", "model.d_model=130", "model.d_model=130 is not divisible by model.n_head=4"),
    ],
)
def test_out_of_range_values_name_the_key_and_range(stage, override, needle):
    extra = {"generate": ["checkpoint=x"], "chat": ["checkpoint=x"], "evaluate": ["checkpoint=x"]}.get(stage, [])
    if "d_model" in override:
        extra = ["model.n_head=4"]
    assert needle in _refused(stage, *extra, override)


def test_boundary_values_are_accepted():
    cfg = _check("pretrain", "optim.lr=0", "optim.beta2=0", "trainer.eval_every=0", "scheduler.warmup_steps=0")
    assert cfg.optim.lr == 0 and cfg.trainer.eval_every == 0


def test_range_table_names_real_numeric_keys():
    for key in RANGES:
        group, _, name = key.rpartition(".")
        assert name in {f.name for f in dataclasses.fields(schema_class(group))}, key
    assert str(Range(0, 1, high_open=True)) == "in [0, 1)" and str(Range(1)) == ">= 1"


def test_corpus_size_check_is_the_loaders_exact_need(tmp_path):
    T = 64
    PackedWindows(np.arange(min_train_tokens(T)), T, 1, seed=0)  # exactly enough
    with pytest.raises(ValueError):
        PackedWindows(np.arange(min_train_tokens(T) - 1), T, 1, seed=0)
    from llmtrain.data.pipeline import load_corpus

    path = tmp_path / "short.txt"
    path.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 1)
    cfg = _check("pretrain", "data=text", f"data.path={path}", "data.seq_len=64", f"data.cache_dir={tmp_path / 'c'}")
    with pytest.raises(UserError) as e:
        load_corpus(cfg)
    assert "training tokens are too few for data.seq_len=64, which needs at least 129" in str(e.value)


# ----------------------------------------------------------------------------- item 12: threads
def test_thread_count_precedence():
    assert resolve_threads(3, "2", 16, 4)[0] == 3  # trainer.threads wins
    assert resolve_threads(0, "2", 16, 4)[0] == 2  # then the user's OMP_NUM_THREADS
    assert resolve_threads(0, "", 16, 4)[0] == 4  # else cores / local processes
    assert resolve_threads(0, "", 2, 4)[0] == 1


def test_auto_threads_divide_the_cores_between_local_ranks(monkeypatch):
    import os

    before = torch.get_num_threads()
    monkeypatch.delenv("LLMTRAIN_USER_OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    try:
        assert apply_threads(0) == max(1, len(os.sched_getaffinity(0)) // 2) == torch.get_num_threads()
        monkeypatch.setenv("LLMTRAIN_USER_OMP_NUM_THREADS", "3")  # the user's value, not a launcher's
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert apply_threads(0) == 3
    finally:
        torch.set_num_threads(before)


def test_a_joblib_sweep_job_counts_the_jobs_beside_it():
    from hydra.core.hydra_config import HydraConfig

    from llmtrain.threads import joblib_jobs

    with hydra_session("pretrain"):
        cfg = compose_run("pretrain", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.mode=MULTIRUN"])
        HydraConfig.instance().set_config(cfg)
        try:
            assert joblib_jobs() == 2
        finally:
            HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["trainer.chunked_loss=false"], "drop trainer.chunked_loss=false"),
        (["trainer.compile=true"], "trainer.compile=true"),
    ],
)
def test_deferred_head_gradient_conflicts_are_refused(overrides, needle):
    msg = _refused("pretrain", "trainer.defer_head_grad=true", *overrides)
    assert "trainer.defer_head_grad=true" in msg and needle in msg
    _check("pretrain", "trainer.defer_head_grad=true")  # with the chunked loss (auto) it composes
