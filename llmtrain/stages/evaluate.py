"""evaluate: score a checkpoint on eval.tasks and write eval.json, eval.md and a table.

    llmtrain evaluate checkpoint=RUN_DIR                                # its own task / objective
    llmtrain evaluate checkpoint=RUN_DIR eval.tasks=[lm] data=text data.path=FILE   # all of FILE: eval/*
    llmtrain evaluate checkpoint=RUN_DIR eval.split=val data=text data.path=FILE    # its last 10%: val/*
    llmtrain evaluate checkpoint=RUN_DIR eval.tasks=[generation] task.val_path=dev.jsonl

The tasks live in llmtrain/eval/suite.py; under torchrun each rank scores a shard and the
metrics are combined exactly once (see llmtrain/data/validation.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmtrain import checkpoints
from llmtrain.compress.layout import compression_of
from llmtrain.compress.report import compression_report
from llmtrain.config.schema import RunConfig
from llmtrain.distributed import world
from llmtrain.errors import UserError
from llmtrain.eval.report import print_table, write_reports
from llmtrain.eval.suite import EVAL_TASKS, EvalContext, default_tasks, task_overrides
from llmtrain.run_records import write_run_files
from llmtrain.runtime import setup_runtime


def _loader(path: str, device, task_cfg):
    """The checkpoint through the one loader; task.* keys given on the command line (e.g.
    task.val_path=OTHER_FILE) rebuild a fine-tuned checkpoint's task on other evaluation data."""

    def load():
        loaded = checkpoints.load(path, device)
        given = task_overrides(task_cfg)
        if loaded.task is not None and given:
            loaded.task = checkpoints.task_of(loaded, **given)
        return loaded

    return load


def _compression_report(cfg: RunConfig, path, meta: dict, run_dir) -> None:
    """A compressed checkpoint (quantized, pruned, distilled, or a recovery fine-tune of one) is
    also measured against the model it came from: compression.json / compression.md."""
    source = compression_of(meta).get("source")
    if not source:
        return
    if world()[1] > 1:  # the report scores both models on one process (rank 0 alone would wait on the others)
        print("evaluate: run without torchrun for the compression report (compression.json)", flush=True)
        return
    if not checkpoints.is_hf(source) and not Path(source).exists():
        print(f"evaluate: the source model {source} is gone; no compression report", flush=True)
        return
    cpu = torch.device("cpu")
    compression_report(checkpoints.load(source, cpu), checkpoints.load(path, cpu), cfg, run_dir)
    print(f"wrote {run_dir / 'compression.json'} and compression.md", flush=True)


def _scored_parts(data: dict) -> list[dict]:
    """The sources a task's data record describes: a mixture's lm task records each of its sources."""
    return data["sources"] if "sources" in data else [data]


def _files_read(cfg: RunConfig, details: dict) -> list[str | None]:
    """The data sources the evaluation read: the text it scored, the task files it was given."""
    paths = [
        part["path"] for d in details.values() if isinstance(d.get("data"), dict) for part in _scored_parts(d["data"])
    ]
    return list(dict.fromkeys([*paths, cfg.task.val_path, cfg.task.train_path]))


def run(cfg: RunConfig) -> float | None:
    if not cfg.checkpoint:
        raise UserError("evaluate needs checkpoint=PATH (a checkpoint or run directory)")
    info = checkpoints.read(cfg.checkpoint)  # hf: directories get a synthesized meta
    path, meta = info.path, info.meta
    source = cfg.checkpoint if checkpoints.is_hf(cfg.checkpoint) else str(path)
    tasks = list(cfg.eval.tasks) or default_tasks(meta)
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        raise UserError(f"eval.tasks: unknown task {unknown[0]!r} (choose from {', '.join(EVAL_TASKS)})")
    rt = setup_runtime(cfg)
    ctx = EvalContext(cfg, rt.device, rt.precision, rt.run_dir, _loader(source, rt.device, cfg.task))
    ctx.load()  # a corrupt checkpoint fails here, before any output is written

    results: dict = {"checkpoint": str(path), "tasks": tasks}
    details: dict = {}
    for name in dict.fromkeys(tasks):
        res = EVAL_TASKS[name](ctx)
        results.update(res.metrics)
        details[name] = res.details
    scored = [d["data"] for d in details.values() if isinstance(d.get("data"), dict)]
    if scored:  # the data the lm / mlm / nsp tasks scored: source, split, files with sha256
        results["data"] = scored[0]
    results["details"] = details
    if rt.is_main:
        rt.run_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(rt.run_dir, cfg, _files_read(cfg, details))
        write_reports(rt.run_dir, results)
        print(f"evaluate: {path} ({', '.join(tasks)})")
        for d in _scored_parts(scored[0]) if scored else []:
            whole = d["split"] == "all" or d["key"] == "data.val_path"
            prefix = "eval" if d["split"] == "all" else "val"
            part = f"{'all of it' if whole else 'its last data.val_fraction'} ({d['key']}, metrics {prefix}/*)"
            docs = f"{d['documents']:,} document{'s' if d['documents'] != 1 else ''}"
            name = f" (source {d['name']})" if "name" in d else ""
            print(f"scored {d['path']}{name}: {part}, {docs}, {d['tokens']:,} tokens")
        print_table({k: v for k, v in results.items() if "/" in k})
        print(f"wrote {rt.run_dir / 'eval.json'} and eval.md", flush=True)
        _compression_report(cfg, path, meta, rt.run_dir)
    value = results.get(cfg.optimize_metric)
    return float(value) if isinstance(value, (int, float)) else None
