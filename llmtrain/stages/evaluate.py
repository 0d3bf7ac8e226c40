"""evaluate: score a checkpoint on eval.tasks and write eval.json, eval.md and a table.

    llmtrain evaluate checkpoint=RUN_DIR                                # its own task / objective
    llmtrain evaluate checkpoint=RUN_DIR eval.tasks=[lm] data=text data.path=FILE
    llmtrain evaluate checkpoint=RUN_DIR eval.tasks=[generation] task.val_path=dev.jsonl

The tasks live in llmtrain/eval/suite.py; under torchrun each rank scores a shard and the
metrics are combined exactly once (see llmtrain/train/validation.py).
"""
from __future__ import annotations

import dataclasses

from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.eval.report import print_table, write_reports
from llmtrain.eval.suite import EVAL_TASKS, EvalContext, default_tasks, task_overrides
from llmtrain.stages.common import load_checkpoint, setup_runtime
from llmtrain.train import checkpoint as ckpt


def _loader(path: str, device, meta: dict, task_cfg):
    """Fine-tuned checkpoints come back through their task (heads, adapters); others as plain models."""
    def load():
        if meta.get("task"):
            from llmtrain.tasks import load_task_model

            model, task, loaded = load_task_model(path, device)
            given = task_overrides(task_cfg)
            if given:  # e.g. task.val_path=OTHER_FILE: the same task, other evaluation data
                from llmtrain.tasks import build_task

                task = build_task(dataclasses.replace(task.cfg, **given), task.tokenizer, task.model_cfg,
                                  task.data_cfg, task.state())
            return model, loaded.tokenizer, loaded.meta, task
        loaded = load_checkpoint(path, device)
        return loaded.model, loaded.tokenizer, loaded.meta, None
    return load


def run(cfg: RunConfig) -> float | None:
    if not cfg.checkpoint:
        raise UserError("evaluate needs checkpoint=PATH (a checkpoint or run directory)")
    if cfg.checkpoint.startswith("hf:"):  # a transformers directory: meta is synthesized
        from llmtrain.hf.load import hf_meta

        path, meta = hf_meta(cfg.checkpoint)
        source = cfg.checkpoint
    else:
        path = ckpt.resolve_checkpoint(cfg.checkpoint)
        meta = ckpt.load_meta(path)
        source = str(path)
    tasks = list(cfg.eval.tasks) or default_tasks(meta)
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        raise UserError(f"eval.tasks: unknown task {unknown[0]!r} (choose from {', '.join(EVAL_TASKS)})")
    rt = setup_runtime(cfg)
    ctx = EvalContext(cfg, rt.device, rt.precision, rt.run_dir, _loader(source, rt.device, meta, cfg.task))
    ctx.load()  # a corrupt checkpoint fails here, before any output is written

    results: dict = {"checkpoint": str(path), "tasks": tasks}
    details: dict = {}
    for name in dict.fromkeys(tasks):
        res = EVAL_TASKS[name](ctx)
        results.update(res.metrics)
        details[name] = res.details
    if "lm" in details:
        results["data"] = details["lm"].get("data")
    results["details"] = details
    if rt.is_main:
        write_reports(rt.run_dir, results)
        print(f"evaluate: {path} ({', '.join(tasks)})")
        print_table({k: v for k, v in results.items() if "/" in k})
        print(f"wrote {rt.run_dir / 'eval.json'} and eval.md", flush=True)
    value = results.get(cfg.optimize_metric)
    return float(value) if isinstance(value, (int, float)) else None
