"""Knowledge distillation as a Trainee: a student learns from a frozen teacher's soft targets.

    trainee = Distillation(base, teacher_model, cfg.distill, classes)   # base: clm / mlm / classification
    loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * task loss
           (+ hidden_weight * MSE(projection(student hidden), teacher hidden))

The base trainee (an objective or a task) gives the batches; the loss is computed here on the
same rows for student and teacher: every labelled position (clm), the masked positions only
(mlm), the class logits (classification). The teacher is not a module of the loss module, so
no wrapper (DDP, FSDP) sees it and no checkpoint holds it; it runs under the student's
autocast, in inference mode. The hidden-state projection is `extra`: the trainer optimises it
with the student and keeps it in the train state, not in the student's weights.

Validation reports the student's own task loss as val/loss (what a model trained without the
teacher is judged on), with the KD term beside it as val/kd_loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmtrain.config.schema import DistillConfig
from llmtrain.objectives.base import LossOutput, Trainee
from llmtrain.objectives.mlm import keep_params_in_graph

KINDS = ("clm", "mlm", "classification")


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2 per row of [N, C] logits, averaged over the rows
    (weighted by `weight`, e.g. 0 for unlabelled positions). T^2 keeps the gradient's scale
    independent of T (Hinton et al., 2015)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    mean = kl.mean() if weight is None else (kl * weight).sum() / weight.sum().clamp(min=1)
    return mean * temperature**2


@dataclass
class Rows:
    """What one model gives for a batch: logits [N, C] of the rows with a target, the targets
    (-100: none), and the final hidden states [M, D] matched by the hidden-state loss with
    their weights (None: all count)."""

    logits: torch.Tensor
    target: torch.Tensor
    hidden: torch.Tensor
    hidden_weight: torch.Tensor | None


def rows(kind: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> Rows:
    if kind == "clm":
        h = model.encode(batch["input_ids"])
        target = batch["labels"].reshape(-1)
        flat = h.reshape(-1, h.size(-1))
        return Rows(model.lm_logits(flat), target, flat, (target != -100).float())
    if kind == "mlm":
        h = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        pos = batch["mlm_positions"]  # found on the host (Masker.apply): no boolean indexing here
        masked = h.reshape(-1, h.size(-1)).index_select(0, pos)
        return Rows(model.lm_logits(masked), batch["labels"].reshape(-1).index_select(0, pos), masked, None)
    h = model.hidden(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    logits = model.classify(h, batch["input_ids"], batch["attention_mask"])
    return Rows(logits, batch["labels"], h.reshape(-1, h.size(-1)), batch["attention_mask"].reshape(-1).float())


class Distillation(Trainee):
    def __init__(
        self,
        base: Trainee,
        kind: str,
        teacher: nn.Module,
        cfg: DistillConfig,
        classes: int,
        student_dim: int,
        teacher_dim: int,
    ):
        """`classes`: the logits compared (the tokenizer's vocabulary: padded embedding rows are
        no tokens; or the labels)."""
        assert kind in KINDS, kind
        self.base, self.kind, self.teacher, self.cfg, self.classes = base, kind, teacher, cfg, classes
        self.name, self.needs_decoder = base.name, base.needs_decoder
        teacher.eval().requires_grad_(False)
        # Trained with the student, saved in its train state only (see the trainer's `extra`).
        self.extra = nn.Linear(student_dim, teacher_dim, bias=False) if cfg.hidden_weight > 0 else None

    def train_source(self, rank=0, world=1):
        return self.base.train_source(rank, world)

    def val_batches(self, max_batches=0, rank=0, world=1):
        return self.base.val_batches(max_batches, rank, world)

    def loss(self, model, batch):
        s = rows(self.kind, model, batch)
        with torch.inference_mode():
            t = rows(self.kind, self.teacher, batch)
        # Inference tensors cannot be saved for the backward: normal copies.
        t_logits, t_hidden = t.logits[:, : self.classes].clone(), t.hidden.clone()
        valid = (s.target != -100).float()
        n = valid.sum().to(torch.long)
        task = F.cross_entropy(s.logits.float(), s.target, ignore_index=-100)
        kd = kd_loss(s.logits[:, : self.classes], t_logits, self.cfg.temperature, valid)
        extras = {"kd_loss": (kd.detach() * n, n), "task_loss": (task.detach() * n, n)}
        if self.kind != "clm":  # the base trainee's own extra (accuracy, mlm_accuracy)
            correct = ((s.logits.argmax(-1) == s.target).float() * valid).sum()
            extras["accuracy" if self.kind == "classification" else "mlm_accuracy"] = (correct, n)
        a = self.cfg.alpha
        loss = a * kd + (1 - a) * task
        if self.extra is not None:
            err = (self.extra(s.hidden).float() - t_hidden.float()).pow(2).mean(-1)
            w = s.hidden_weight
            mse = err.mean() if w is None else (err * w).sum() / w.sum().clamp(min=1)
            loss = loss + self.cfg.hidden_weight * mse
            extras["hidden_loss"] = (mse.detach() * n, n)
        if not model.training:  # validation: the student's own task loss (see the module docstring)
            loss = task
        elif self.kind == "mlm":  # DDP needs a gradient for the unused NSP head too
            loss = keep_params_in_graph(model, s.hidden[None], loss, "nsp")
        return LossOutput(loss=loss, n_targets=n, extras=extras)
