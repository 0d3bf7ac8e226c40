"""distill: a teacher checkpoint (teacher=PATH) + a student (model=PRESET from scratch, or
init_from=PATH) -> the shared trainer on the Distillation trainee -> the student's checkpoint,
then the compression report of the student against the teacher (llmtrain/compress/report.py:
parameters, bytes, validation metrics and generation speed on the same data; compression.json
and compression.md in the run directory).

task=lm trains on data.path with objective clm or mlm (the teacher is a pretrained decoder or
encoder); task=classification distils a fine-tuned classifier's logits into a classifier
student with the teacher's labels. Teacher and student must share a tokenizer: KD compares
their distributions token by token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmtrain import checkpoints
from llmtrain.checkpoints import Loaded, checkpoint_meta
from llmtrain.compress.report import compression_report
from llmtrain.config.schema import ModelConfig, RunConfig
from llmtrain.data.pipeline import load_corpus
from llmtrain.data.validation import sum_losses
from llmtrain.errors import UserError
from llmtrain.models import build_model, model_class, resolve_model_config
from llmtrain.objectives import Trainee, build_objective
from llmtrain.objectives.distill import Distillation
from llmtrain.run_dir import claim
from llmtrain.runtime import hydra_overrides, setup_runtime
from llmtrain.stages.pretrain import train_and_report
from llmtrain.tasks import build_task, task_meta
from llmtrain.tokenizers import Tokenizer
from llmtrain.train.device import autocast

LM_OBJECTIVES = ("clm", "mlm")


@dataclass
class Student:
    model: torch.nn.Module
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    base: Trainee  # the objective or task it would train on without the teacher
    classes: int  # the logits KD compares: the tokenizer's vocabulary (no padded rows) or the labels
    data: str  # what it trains on, for the start line


def run(cfg: RunConfig) -> float | None:
    kind = distill_kind(cfg)
    if cfg.distill.hidden_weight > 0 and cfg.trainer.strategy == "fsdp":
        raise UserError("distill.hidden_weight > 0 trains a projection FSDP does not shard; use trainer.strategy=ddp")
    rt = setup_runtime(cfg)
    with claim(cfg, rt) as run_dir:
        teacher = checkpoints.load(cfg.teacher, rt.device)
        student = build_student(cfg, kind, teacher, checkpoints.load(cfg.init_from) if cfg.init_from else None)
        d_student, d_teacher = student.model_cfg.d_model, teacher.model_cfg.d_model
        trainee = Distillation(student.base, kind, teacher.model, cfg.distill, student.classes, d_student, d_teacher)
        meta = checkpoint_meta(cfg, student.model_cfg, student.tokenizer)
        meta["teacher"] = str(teacher.path)
        # evaluate measures a compressed checkpoint against its source (llmtrain/compress/report.py)
        meta["compression"] = {"method": "distill", "source": str(teacher.path)}
        if kind == "classification":
            meta["task"] = task_meta(student.base)
        teacher_val = validation(student.base, teacher.model, cfg, rt)  # every rank: the sums are all-reduced
        if rt.is_main:
            print(
                f"distill: teacher {teacher.path} ({count(teacher.model) / 1e6:.2f}M params, val/loss "
                f"{teacher_val['val/loss']:.4f}); alpha {cfg.distill.alpha}, temperature {cfg.distill.temperature}"
                + (f", hidden_weight {cfg.distill.hidden_weight}" if cfg.distill.hidden_weight > 0 else ""),
                flush=True,
            )
        n_student = count(student.model)  # before the trainer wraps (maybe shards) it
        result = train_and_report(cfg, rt, run_dir, student.model, trainee, student.data, meta)
        if rt.is_main and result.metrics:
            if rt.dist.world_size > 1:  # the report scores both models in one process
                print_table(count(teacher.model), teacher_val, n_student, result.metrics)
                print("distill: no compression.json under several processes (run llmtrain evaluate on the student)")
            else:
                cpu = torch.device("cpu")
                compression_report(
                    checkpoints.load(teacher.path, cpu), checkpoints.load(result.checkpoint, cpu), cfg, rt.run_dir
                )
                print(f"wrote {rt.run_dir / 'compression.json'} and compression.md", flush=True)
        return result.metrics.get(cfg.optimize_metric)


def build_student(cfg: RunConfig, kind: str, teacher: Loaded, init: Loaded | None) -> Student:
    """The student (model=PRESET, or init_from's checkpoint) with its data, after checking that
    it shares the teacher's tokenizer and that the teacher fits the kind of distillation."""
    check_teacher(cfg, kind, teacher)
    tokenizer = init.tokenizer if init else None
    if kind == "classification":
        tokenizer = tokenizer or scratch_task_tokenizer(cfg, teacher)
        check_same_tokenizer(teacher, tokenizer)
        task = student_task(cfg, teacher, init, tokenizer)
        model, model_cfg = task_student(cfg, task, init, tokenizer)
        return Student(model.train(), model_cfg, tokenizer, task, len(task.labels), task.summary())
    if tokenizer is not None:  # before the init checkpoint's tokenizer prepares the data
        check_same_tokenizer(teacher, tokenizer)
    tokenizer, splits = load_corpus(cfg, tokenizer=tokenizer)
    if init is None:  # built from tokenizer=... on data.path
        check_same_tokenizer(teacher, tokenizer)
    model_cfg = init.model_cfg if init else resolve_model_config(cfg.model, tokenizer)
    check_student(kind, model_cfg, cfg.data.seq_len)
    model = init.backbone if init else build_model(model_cfg)
    base = build_objective(cfg.objective, tokenizer, splits, cfg.data, cfg.trainer.seed)
    model.train()  # loaded checkpoints come in eval mode
    return Student(model, model_cfg, tokenizer, base, tokenizer.vocab_size, splits.describe())


def distill_kind(cfg: RunConfig) -> str:
    """clm | mlm (task=lm, by objective) | classification."""
    if cfg.task.name == "classification":
        return "classification"
    if cfg.task.name != "lm":
        raise UserError(
            f"distill supports task=lm (objective=clm or mlm) or task=classification, not task={cfg.task.name}"
        )
    if cfg.objective.name not in LM_OBJECTIVES:
        raise UserError(f"distill supports objective=clm or objective=mlm, not objective={cfg.objective.name}")
    return cfg.objective.name


def comparable_state(tokenizer) -> dict:
    # A sentencepiece state records where its model file was, for information only.
    return {k: v for k, v in tokenizer.state().items() if k != "path"}


def check_same_tokenizer(teacher: Loaded, tokenizer) -> None:
    if comparable_state(teacher.tokenizer) != comparable_state(tokenizer):
        raise UserError(
            f"teacher={teacher.path} uses another tokenizer ({teacher.tokenizer.name}, "
            f"{teacher.tokenizer.vocab_size} tokens) than the student ({tokenizer.name}, {tokenizer.vocab_size} "
            "tokens); distillation compares their predictions token by token, so they must share one"
        )


def scratch_task_tokenizer(cfg: RunConfig, teacher: Loaded):
    """A classifier student from scratch has no corpus to build a tokenizer on: it takes the
    teacher's, and a different one named on the command line is refused."""
    chosen = [o for o in hydra_overrides() if o.lstrip("+~").startswith("tokenizer")]
    if chosen and cfg.tokenizer.name != teacher.tokenizer.name:
        raise UserError(
            f"tokenizer={cfg.tokenizer.name} differs from the teacher's tokenizer ({teacher.tokenizer.name}, "
            f"{teacher.path}); a classifier student from scratch uses the teacher's"
        )
    return teacher.tokenizer


def check_teacher(cfg: RunConfig, kind: str, teacher: Loaded) -> None:
    task = teacher.task.name if teacher.task is not None else None
    if kind == "classification":
        if task != "classification":
            raise UserError(f"teacher={teacher.path} is not a fine-tuned classifier (task={task or 'none'})")
    elif task not in (None, "lm"):
        raise UserError(f"teacher={teacher.path} is a task={task} model; objective={kind} needs a language model")
    else:
        check_student(kind, teacher.model_cfg, cfg.data.seq_len, who=f"teacher={teacher.path}")


def check_student(kind: str, model_cfg, seq_len: int, who: str = "the student") -> None:
    is_decoder = bool(getattr(model_class(model_cfg.name), "is_decoder", True))
    if kind in LM_OBJECTIVES and is_decoder != (kind == "clm"):
        need = "a causal decoder" if kind == "clm" else "an encoder"
        raise UserError(f"objective={kind} needs {need}, but {who} is a {model_cfg.name!r} model")
    if seq_len > model_cfg.max_seq_len:
        raise UserError(f"data.seq_len={seq_len} exceeds the context of {who} ({model_cfg.max_seq_len})")


def student_task(cfg: RunConfig, teacher: Loaded, init: Loaded | None, tokenizer):
    """The classification task on the student's data, with the teacher's labels (one logit each)."""
    model_cfg = init.model_cfg if init else resolve_model_config(cfg.model, tokenizer)
    task = build_task(cfg.task, tokenizer, model_cfg, cfg.data, teacher.task.state(), seed=cfg.trainer.seed)
    if task.seq_len > teacher.model_cfg.max_seq_len:
        raise UserError(f"data.seq_len={task.seq_len} exceeds the teacher's context ({teacher.model_cfg.max_seq_len})")
    return task


def task_student(cfg: RunConfig, task, init: Loaded | None, tokenizer):
    """(classifier student, its backbone config): init_from's classifier when it has the same
    labels, else a new head on init_from's backbone or on model=PRESET built from scratch."""
    if init is not None and init.task is not None and init.task.name == task.name:
        if init.task.state().get("labels") == task.labels:
            return init.model, init.model_cfg
    model_cfg = init.model_cfg if init else resolve_model_config(cfg.model, tokenizer)
    return task.build_model(init.backbone if init else build_model(model_cfg)), model_cfg


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def validation(base, model: torch.nn.Module, cfg: RunConfig, rt) -> dict[str, float]:
    """The base trainee's validation metrics of `model` (the teacher), on the batches the
    trainer scores the student on."""
    was = model.training
    model.eval()

    def loss(batch):
        with autocast(rt.device, rt.precision):
            return base.loss(model, batch)

    batches = base.val_batches(cfg.trainer.eval_batches, rt.dist.rank, rt.dist.world_size)
    sums = sum_losses(loss, batches, rt.device).all_reduce()
    model.train(was)
    val = sums.mean_loss()
    extras = {f"val/{k}": v for k, v in sums.extra_means().items()}
    return {"val/loss": val, "val/ppl": math.exp(min(val, 700.0)), **extras}


def print_table(n_teacher: int, teacher_val: dict, n_student: int, student_val: dict) -> None:
    """Student against teacher on the trainer's validation batches (runs of several processes)."""
    keys = ["val/loss", "val/ppl"] + [k for k in ("val/accuracy", "val/mlm_accuracy") if k in teacher_val]
    rows = [("teacher", n_teacher, teacher_val), ("student", n_student, student_val)]
    print("distill: student against teacher, same validation batches", flush=True)
    print("| model | params | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for name, n, val in rows:
        cells = " | ".join(f"{val[k]:.4f}" if k in val else "-" for k in keys)
        print(f"| {name} | {n:,} | {cells} |", flush=True)
    print(f"params: student/teacher = {n_student / n_teacher:.2f}", flush=True)
