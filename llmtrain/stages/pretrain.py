"""pretrain: tokenizer + corpus -> registry model -> shared trainer -> checkpoint.

init_from=PATH starts from a checkpoint's weights and tokenizer instead (e.g. contrastive
training of an MLM encoder); the checkpoint decides the architecture, and its dropout is kept
unless model.dropout is given on the command line.

data=arithmetic (data.path "task:arithmetic") pretrains on generated problems ("37+58=95" lines
of task=arithmetic's training set, task.digits / task.ops / task.problem_seed) instead of a file;
the held-out problems validate.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from llmtrain import checkpoints
from llmtrain.checkpoints import checkpoint_meta
from llmtrain.config import check_document_model
from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import TokenSplits, token_dtype
from llmtrain.data.pipeline import load_corpus, run_tokenizer
from llmtrain.errors import UserError
from llmtrain.models import build_model, resolve_model_config
from llmtrain.objectives import build_objective, objective_class
from llmtrain.run_dir import RunDir, claim
from llmtrain.run_records import config_dict, write_run_files
from llmtrain.runtime import hydra_overrides, setup_runtime
from llmtrain.train.freeze import freeze_unused, frozen_prefixes
from llmtrain.train.tracking import MetricsLogger
from llmtrain.train.trainer import Trainer, TrainResult


def run(cfg: RunConfig) -> float | None:
    rt = setup_runtime(cfg)
    with claim(cfg, rt) as run_dir:
        model = model_cfg = tokenizer = splits = None
        if cfg.init_from:
            model, model_cfg, tokenizer, init_path = start_from(cfg)
        objective_cls = objective_class(cfg.objective.name)
        if getattr(objective_cls, "reads_own_data", False):  # sentences or pairs, not a token stream
            tokenizer = tokenizer or run_tokenizer(cfg, lambda: objective_cls.texts(cfg.objective, cfg.data))
        elif cfg.data.path == ARITHMETIC_DATA:
            tokenizer, splits = arithmetic_corpus(cfg, tokenizer)
        else:
            tokenizer, splits = load_corpus(cfg, tokenizer=tokenizer)
        if model is None:
            model_cfg = resolve_model_config(cfg.model, tokenizer)
            model = build_model(model_cfg)
        objective = build_objective(cfg.objective, tokenizer, splits, cfg.data, cfg.trainer.seed, model_cfg)
        if hasattr(objective, "prepare_model"):  # e.g. contrastive refuses a model without dropout
            objective.prepare_model(model, model_cfg)
        # An encoder objective may leave heads untrained (mlm: BERT's NSP head and pooler); a
        # decoder's objectives use every parameter, so large decoders skip the probe step.
        frozen = freeze_unused(model, objective) if objective.needs_decoder is False else []
        if frozen and rt.is_main:
            print(f"{cfg.stage}: {len(frozen)} tensors the objective does not use frozen ({frozen_prefixes(frozen)})")
        meta = checkpoint_meta(cfg, model_cfg, tokenizer)
        if cfg.init_from:
            meta["init_from"] = init_path
        data = splits.describe() if splits is not None else objective.summary()
        result = train_and_report(cfg, rt, run_dir, model, objective, data, meta)
        return result.metrics.get(cfg.optimize_metric)


ARITHMETIC_DATA = "task:arithmetic"


def arithmetic_corpus(cfg: RunConfig, tokenizer=None):
    """The tokenizer and token splits of generated arithmetic problems, one per line (small enough
    to hold in memory, so no prepared-data cache)."""
    from llmtrain.tasks.arithmetic import corpus_texts

    t = cfg.task
    train, val = corpus_texts(t.digits, list(t.ops), t.problem_seed, t.num_train, t.num_val)
    train_text, val_text = "\n".join(train) + "\n", "\n".join(val) + "\n"
    tokenizer = tokenizer or run_tokenizer(cfg, [train_text])
    dtype = token_dtype(tokenizer.vocab_size)
    return tokenizer, TokenSplits(
        train=np.asarray(tokenizer.encode(train_text), dtype=dtype),
        val=np.asarray(tokenizer.encode(val_text), dtype=dtype),
        n_docs=len(train),
        val_bytes=len(val_text.encode()),
        by="problem",  # held out by a hash of the problem (llmtrain/tasks/arithmetic.py)
    )


def start_from(cfg: RunConfig):
    """(model, model config, tokenizer, path) of init_from, checked against the objective."""
    loaded = checkpoints.load(cfg.init_from)
    model = loaded.backbone.train()
    objective_cls = objective_class(cfg.objective.name)
    needs = getattr(objective_cls, "needs_decoder", None)
    is_decoder = bool(getattr(model, "is_decoder", True))
    enc_dec = bool(getattr(model, "is_encoder_decoder", False))
    if getattr(objective_cls, "needs_encoder_decoder", False) != enc_dec:
        raise UserError(
            f"objective={cfg.objective.name} does not fit init_from={cfg.init_from}, "
            f"{'an' if enc_dec else 'not an'} encoder-decoder ({loaded.model_cfg.name})"
        )
    if needs is not None and needs != is_decoder:
        want = "a causal decoder" if needs else "an encoder (bert)"
        raise UserError(
            f"objective={cfg.objective.name} needs {want}, but init_from={cfg.init_from} is a "
            f"{loaded.model_cfg.name} {'decoder' if is_decoder else 'encoder'}"
        )
    if cfg.data.document_mask:
        check_document_model(model, f"init_from={cfg.init_from} ({loaded.model_cfg.name})")
    model_cfg = loaded.model_cfg
    if any(o.lstrip("+~").split("=", 1)[0] == "model.dropout" for o in hydra_overrides()):
        model_cfg = dataclasses.replace(model_cfg, dropout=cfg.model.dropout)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = model_cfg.dropout
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the checkpoint's context ({model_cfg.max_seq_len})")
    return model, model_cfg, loaded.tokenizer, str(loaded.path)


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
