"""The allowed range of each numeric key, as data: `check_ranges` reads it before any work,
and help or docs can print it. A value outside its range is one line naming the key and the
range, instead of a torch error (lr < 0, beta2 >= 1) or a silent misreading (eval_every=-1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmtrain.errors import UserError


@dataclass(frozen=True)
class Range:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
UNIT_OPEN = Range(0, 1, high_open=True)  # [0, 1): probabilities that must leave something
UNIT = Range(0, 1)

# dotted key -> allowed range. Optional keys set to None (e.g. top_k) are not checked.
RANGES: dict[str, Range] = {
    "model.n_layer": AT_LEAST_1,
    "quant.group_size": Range(2),
    "quant.calibration": AT_LEAST_0,
    "prune.sparsity": UNIT_OPEN,
    "prune.calibration": AT_LEAST_1,
    "finetune.qat_group_size": Range(2),
    "model.n_head": AT_LEAST_1,
    "model.n_kv_heads": AT_LEAST_1,
    "model.d_model": AT_LEAST_1,
    "model.max_seq_len": AT_LEAST_1,
    "model.dropout": UNIT_OPEN,
    "model.extra_ids": AT_LEAST_0,
    "model.head_dim": AT_LEAST_1,
    "model.relative_buckets": Range(4),
    "model.relative_max_distance": AT_LEAST_1,
    "objective.noise_density": Range(0, 1, low_open=True, high_open=True),
    "objective.mean_span_length": Range(1),
    "data.seq_len": AT_LEAST_1,
    "data.batch_size": AT_LEAST_1,
    "data.val_fraction": UNIT_OPEN,
    "data.num_proc": AT_LEAST_1,
    "tokenizer.vocab_size": AT_LEAST_1,
    "optim.lr": AT_LEAST_0,
    "optim.muon_lr": AT_LEAST_0,
    "optim.weight_decay": AT_LEAST_0,
    "optim.beta1": UNIT_OPEN,
    "optim.beta2": UNIT_OPEN,
    "optim.eps": AT_LEAST_0,
    "optim.grad_clip": AT_LEAST_0,
    "scheduler.warmup_steps": AT_LEAST_0,
    "scheduler.min_lr_ratio": UNIT,
    "scheduler.decay_fraction": UNIT,
    "trainer.max_steps": AT_LEAST_1,
    "trainer.eval_every": AT_LEAST_0,
    "trainer.eval_batches": AT_LEAST_0,
    "trainer.log_every": AT_LEAST_1,
    "trainer.ckpt_every": AT_LEAST_0,
    "trainer.keep_last": AT_LEAST_0,
    "trainer.grad_accum": AT_LEAST_1,
    "trainer.devices": AT_LEAST_1,
    "trainer.max_bad_steps": AT_LEAST_0,
    "trainer.threads": AT_LEAST_0,
    "finetune.lora.r": AT_LEAST_0,
    "finetune.lora.dropout": UNIT_OPEN,
    "distill.alpha": UNIT,
    "distill.temperature": Range(0, low_open=True),
    "distill.hidden_weight": AT_LEAST_0,
    "generate.max_new_tokens": AT_LEAST_0,
    "generate.num_samples": AT_LEAST_1,
    "chat.max_new_tokens": AT_LEAST_0,
    "eval.max_new_tokens": AT_LEAST_0,
    "eval.num_beams": AT_LEAST_1,
    "generate.num_beams": AT_LEAST_1,
    "chat.num_beams": AT_LEAST_1,
    "task.num_beams": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
    "eval.max_examples": AT_LEAST_0,
    "task.max_new_tokens": AT_LEAST_0,
    "task.max_examples": AT_LEAST_0,
    "task.digits": Range(1, 9),
    "task.num_train": AT_LEAST_1,
    "task.num_val": AT_LEAST_1,
    "rl.group_size": Range(2),
    "rl.max_new_tokens": AT_LEAST_1,
    "rl.temperature": Range(0, low_open=True),
    "rl.top_k": AT_LEAST_1,
    "rl.kl_coef": AT_LEAST_0,
    "rl.clip_eps": Range(0, low_open=True),
    "rl.iterations": AT_LEAST_1,
    "rl.eval_prompts": AT_LEAST_0,
    "rl.num_samples": AT_LEAST_0,
    "rl.reward_batch_size": AT_LEAST_1,
    "objective.temperature": Range(0, low_open=True),
    "embed.batch_size": AT_LEAST_1,
    "task.beta": Range(0, low_open=True),
    "task.gamma": AT_LEAST_0,
    "task.rpo_alpha": AT_LEAST_0,
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def check_ranges(cfg: Any, keys: dict[str, Range] = RANGES) -> None:
    """UserError for the first key of `cfg` (the typed RunConfig) outside its range."""
    for key, allowed in keys.items():
        value = _get(cfg, key)
        if value is not None and not allowed.contains(value):
            raise UserError(f"{key} must be {allowed}, got {value}")
