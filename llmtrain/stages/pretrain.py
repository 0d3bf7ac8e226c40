"""pretrain: tokenizer + corpus -> registry model -> shared trainer -> checkpoint.

data=arithmetic (data.path "task:arithmetic") pretrains on generated problems ("37+58=95" lines
of task=arithmetic's training set, task.digits / task.ops / task.problem_seed) instead of a file;
the held-out problems validate.
"""

from __future__ import annotations

import numpy as np

from llmtrain.checkpoints import checkpoint_meta
from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import TokenSplits, token_dtype
from llmtrain.data.pipeline import load_corpus, run_tokenizer
from llmtrain.models import build_model, resolve_model_config
from llmtrain.objectives import build_objective
from llmtrain.run_dir import RunDir, claim
from llmtrain.run_records import config_dict, write_run_files
from llmtrain.runtime import setup_runtime
from llmtrain.train.tracking import MetricsLogger
from llmtrain.train.trainer import Trainer, TrainResult


def run(cfg: RunConfig) -> float | None:
    rt = setup_runtime(cfg)
    with claim(cfg, rt) as run_dir:
        tokenizer, splits = arithmetic_corpus(cfg) if cfg.data.path == ARITHMETIC_DATA else load_corpus(cfg)
        model_cfg = resolve_model_config(cfg.model, tokenizer)
        model = build_model(model_cfg)
        objective = build_objective(cfg.objective, tokenizer, splits, cfg.data, cfg.trainer.seed, model_cfg)
        meta = checkpoint_meta(cfg, model_cfg, tokenizer)
        data = splits.describe()
        result = train_and_report(cfg, rt, run_dir, model, objective, data, meta)
        return result.metrics.get(cfg.optimize_metric)


ARITHMETIC_DATA = "task:arithmetic"


def arithmetic_corpus(cfg: RunConfig):
    """The tokenizer and token splits of generated arithmetic problems, one per line (small enough
    to hold in memory, so no prepared-data cache)."""
    from llmtrain.tasks.arithmetic import corpus_texts

    t = cfg.task
    train, val = corpus_texts(t.digits, list(t.ops), t.problem_seed, t.num_train, t.num_val)
    train_text, val_text = "\n".join(train) + "\n", "\n".join(val) + "\n"
    tokenizer = run_tokenizer(cfg, [train_text])
    dtype = token_dtype(tokenizer.vocab_size)
    return tokenizer, TokenSplits(
        train=np.asarray(tokenizer.encode(train_text), dtype=dtype),
        val=np.asarray(tokenizer.encode(val_text), dtype=dtype),
        n_docs=len(train),
        val_bytes=len(val_text.encode()),
        by="problem",  # held out by a hash of the problem (llmtrain/tasks/arithmetic.py)
    )


def train_and_report(cfg, rt, run_dir: RunDir, model, objective, data: str, meta) -> TrainResult:
    """Start (the resume checkpoint checked before anything is written), write the run files,
    train, report (also used by distill)."""
    n = sum(p.numel() for p in model.parameters())  # before the trainer wraps (maybe shards) it
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger = MetricsLogger(rt.run_dir, cfg.logger, config_dict(cfg), enabled=rt.is_main)
    trainer = Trainer(cfg, rt, model, objective, logger, meta)
    run_dir.begin(trainer.step if trainer.resumed_from is not None else None)
    if rt.is_main:
        write_run_files(rt.run_dir, cfg)
        print(
            f"{cfg.stage}: {meta['model']['name']} {n / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable), "
            f"{data}, device {rt.device} "
            f"{rt.precision} {rt.threads} threads, run dir {rt.run_dir}",
            flush=True,
        )
    try:
        logger.open()
        result = trainer.fit()
    finally:
        logger.close()
    if rt.is_main and result.metrics and not result.interrupted:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"done at step {result.step}: {shown}; checkpoint {result.checkpoint}", flush=True)
    if rt.is_main:
        write_curves(rt.run_dir)
    if result.interrupted:
        raise result.interruption(rt.run_dir)
    return result


def write_curves(run_dir) -> None:
    """RUN_DIR/curves.png from metrics.jsonl. A missing matplotlib (or any plotting problem)
    costs one log line, never the run."""
    try:
        from llmtrain.eval.plot import plot_runs

        plot_runs([run_dir], run_dir / "curves.png")
    except ImportError as e:
        print(f"no curves.png: {e}", flush=True)
    except Exception as e:  # noqa: BLE001 - the checkpoint is saved; a plot must not fail the run
        print(f"no curves.png: {type(e).__name__}: {e}", flush=True)
