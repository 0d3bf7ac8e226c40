"""rl: a checkpoint (init_from=PATH) + the prompts of a task + a reward -> GRPO in the shared
trainer (llmtrain/grpo.py) -> a policy checkpoint.

    llmtrain rl init_from=RUN task=arithmetic rl.reward=arithmetic rl.group_size=8

The reference is a frozen copy of init_from. The final checkpoint records the task, so
`llmtrain evaluate checkpoint=RUN` scores it on the task (exact match for arithmetic).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from llmtrain import checkpoints
from llmtrain.checkpoints import checkpoint_meta
from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.grpo import GRPO, SAMPLES_FILE, reward_function
from llmtrain.run_dir import RunDir, claim
from llmtrain.run_records import config_dict, write_run_files
from llmtrain.runtime import setup_runtime
from llmtrain.stages.pretrain import write_curves
from llmtrain.tasks import build_task, stop_strings, task_meta
from llmtrain.tasks.base import train_val_records
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.tracking import MetricsLogger, reconcile_metrics
from llmtrain.train.trainer import Trainer


def run(cfg: RunConfig) -> float | None:
    if not cfg.init_from:
        raise UserError("rl needs init_from=PATH (the checkpoint to start the policy and the reference from)")
    if cfg.trainer.strategy == "fsdp":
        raise UserError("rl does not support trainer.strategy=fsdp (rollouts run the whole policy; use ddp)")
    rt = setup_runtime(cfg)
    with claim(cfg, rt) as run_dir:
        return _rl(cfg, rt, run_dir)


def prompts_of(task, split: str) -> list[tuple[list[int], Any]]:
    """(prompt ids, prompt) of a task's train or val split: the ids the policy continues (rendered
    as the task renders them), and the prompt the reward reads: the text for arithmetic and other
    generative tasks, the chat messages of preference pairs (task=preference / reward), which a
    reward model renders with its own template."""
    if hasattr(task, "prompt_ids") and task.cfg.pairs == "file":  # preference pairs: each distinct prompt once
        from llmtrain.tasks.preference_data import record_pair

        train, val, train_file, val_file = train_val_records(task.cfg, task.data_cfg)
        records, path = (train, train_file) if split == "train" else (val, val_file)
        seen: dict[str, tuple[list[int], Any]] = {}
        for n, rec in records:
            messages = record_pair(rec, f"{path}: record {n}").prompt
            seen.setdefault(json.dumps(messages), (task.prompt_ids(messages), messages))
        out = list(seen.values())
    else:
        examples = task.train_examples() if split == "train" else task.val_examples()
        out = [(list(e["prompt"]), task.tokenizer.decode(e["prompt"])) for e in examples if e.get("prompt")]
    if not out:
        raise UserError(f"task={task.name} gives no prompts to sample from (e.g. task=arithmetic, instruction)")
    return out


def stop_strings_of(task) -> list[str]:
    """Where a completion ends besides eos: the task's own, or its chat template's end marker."""
    if hasattr(task, "stop_strings"):
        return list(task.stop_strings())
    return list(stop_strings(task.cfg.chat_template))


def _rl(cfg: RunConfig, rt, run_dir: RunDir) -> float | None:
    loaded = checkpoints.load(cfg.init_from)
    policy, tokenizer, model_cfg = loaded.backbone, loaded.tokenizer, loaded.model_cfg
    if not getattr(policy, "is_decoder", True):
        raise UserError(f"rl needs a decoder checkpoint (gpt2, llama); {loaded.path} is a {model_cfg.name!r} encoder")
    task = build_task(cfg.task, tokenizer, model_cfg, cfg.data, seed=cfg.trainer.seed)
    summary = task.summary()  # reads the task's data: bad input fails here
    policy.train().to(rt.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # init_from, before resume loads weights
    reward_fn = reward_function(cfg.rl, task, rt.device)
    trainee = GRPO(
        cfg.rl,
        policy,
        reference,
        tokenizer,
        prompts_of(task, "train"),
        prompts_of(task, "val"),
        reward_fn,
        batch_size=cfg.data.batch_size,
        grad_accum=cfg.trainer.grad_accum,
        seed=cfg.trainer.seed,
        device=rt.device,
        precision=rt.precision,
        stop_strings=stop_strings_of(task),
        run_dir=rt.run_dir,
        is_main=rt.is_main,
    )
    meta = checkpoint_meta(cfg, model_cfg, tokenizer)
    meta.update(init_from=str(loaded.path), task=task_meta(task))
    logger = MetricsLogger(rt.run_dir, cfg.logger, config_dict(cfg), enabled=rt.is_main)
    fresh = cfg.trainer.resume == "never" or not ckpt.list_checkpoints(rt.run_dir / "checkpoints")
    trainer = Trainer(cfg, rt, policy, trainee, logger, meta)  # loads and checks the resume checkpoint
    resumed = trainer.step if trainer.resumed_from is not None else None
    run_dir.begin(resumed)
    if rt.is_main:
        reconcile_metrics(rt.run_dir / SAMPLES_FILE, resumed)
        write_run_files(rt.run_dir, cfg)
        n = sum(p.numel() for p in policy.parameters())
        print(
            f"rl: GRPO from {loaded.path} (step {loaded.meta.get('step')}), {n / 1e6:.2f}M params; {summary}; "
            f"reward {cfg.rl.reward}, {cfg.data.batch_size} prompts x {cfg.rl.group_size} samples per step; "
            f"device {rt.device} {rt.precision} {rt.threads} threads, run dir {rt.run_dir}",
            flush=True,
        )
    try:
        logger.open()
        if fresh:  # the start of the curve: the init_from policy on the held-out prompts
            before = trainee.validate(policy, 0)
            logger.log(before, 0)
            if rt.is_main:
                print("rl: before training " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()), flush=True)
        result = trainer.fit()
    finally:
        logger.close()
    if rt.is_main:
        write_curves(rt.run_dir)
    if result.interrupted:
        raise result.interruption(rt.run_dir)
    if rt.is_main:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"done at step {result.step}: {shown}; checkpoint {result.checkpoint}", flush=True)
    return result.metrics.get(cfg.optimize_metric)
