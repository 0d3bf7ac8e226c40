"""finetune: a checkpoint (init_from=PATH) + a task (task=lm|classification|instruction|
extractive_qa|summarization|reward|preference) -> the shared trainer -> a fine-tuned checkpoint.

Full fine-tuning by default; finetune.lora.r > 0 trains LoRA adapters (and new heads) on a
frozen backbone; finetune.freeze_backbone=true trains the new head only. The final checkpoint
holds merged weights (loadable like any other checkpoint) with meta["task"] = {config, state};
with LoRA, `adapter.safetensors` next to it holds only what was trained (adapters + heads) and
meta["init_from"] names the base. Task metrics (task.evaluate) are computed at the end and
appended to metrics.jsonl as val/<name>.
"""

from __future__ import annotations

import dataclasses

import torch

from llmtrain import checkpoints
from llmtrain.checkpoints import Loaded, checkpoint_meta
from llmtrain.compress import finetune as compressed, prune
from llmtrain.config import check_document_model
from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import unk_report
from llmtrain.data.pipeline import load_corpus
from llmtrain.distributed.wrap import root_unsharded
from llmtrain.errors import UserError
from llmtrain.models.lora import apply_lora, lora_state_dict, merge_lora
from llmtrain.run_dir import RunDir, claim
from llmtrain.run_records import config_dict, write_run_files
from llmtrain.runtime import hydra_overrides, setup_runtime
from llmtrain.tasks import build_task, task_meta
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.freeze import freeze_unused, frozen_prefixes
from llmtrain.train.tracking import MetricsLogger
from llmtrain.train.trainer import Trainer

ADAPTER = "adapter.safetensors"


def load_init(path: str) -> tuple[Loaded, dict[str, torch.Tensor]]:
    """(checkpoint, the full state of what was loaded). An earlier fine-tune is loaded with its
    head (merged), so a head of the same task and shape can be reused."""
    loaded = checkpoints.load(path)
    loaded.model.train()  # training starts from here (the loader hands out eval-mode models)
    return loaded, (loaded.model.state_dict() if loaded.task is not None else {})


def run(cfg: RunConfig) -> float | None:
    if not cfg.init_from:
        raise UserError("finetune needs init_from=PATH (a checkpoint or run directory)")
    rt = setup_runtime(cfg)
    with claim(cfg, rt) as run_dir:
        return _finetune(cfg, rt, run_dir)


def _finetune(cfg: RunConfig, rt, run_dir: RunDir) -> float | None:
    loaded, init_state = load_init(cfg.init_from)
    backbone = loaded.backbone
    tokenizer = loaded.tokenizer
    # The checkpoint decides architecture and tokenizer; dropout may be changed for fine-tuning.
    model_cfg = dataclasses.replace(loaded.model_cfg, dropout=cfg.model.dropout)
    for module in backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = model_cfg.dropout
    _check_tokenizer(cfg, loaded)
    if cfg.data.document_mask:
        check_document_model(backbone, f"init_from={cfg.init_from} ({loaded.model_cfg.name})")
    compressed.check_init(cfg, loaded)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the checkpoint's context ({model_cfg.max_seq_len})")

    splits = load_corpus(cfg, tokenizer=tokenizer)[1] if cfg.task.name == "lm" else None
    task = build_task(cfg.task, tokenizer, model_cfg, cfg.data, seed=cfg.trainer.seed, splits=splits)
    summary = task.summary()  # reads and tokenizes the data: bad input fails here, before training
    counts = getattr(task, "report", {})  # a task's own files: <unk> counted as they are encoded
    unk_line = unk_report(counts.get("unk_tokens", 0), counts.get("tokens", 0), f"task {cfg.task.name}")
    model = task.build_model(backbone)
    prepared = task.prepare(model, rt.device, rt.run_dir, rt.dist.rank, rt.dist.world_size)  # before LoRA: the base
    heads, reused = _init_heads(model, backbone, init_state)
    adapted = _setup_method(cfg, model, backbone, heads)
    unused = freeze_unused(model, task, keep_rng=False)  # as recorded in the golden losses
    if unused:
        adapted += f", {len(unused)} tensors the task does not use frozen ({frozen_prefixes(unused)})"
    noted = compressed.setup(cfg, model, loaded)  # QAT layers; pruning masks are noted
    if noted:
        adapted += f"; {noted}"

    if rt.is_main:
        print(f"finetune: initialised from {loaded.path} (step {loaded.meta.get('step')}); {summary}", flush=True)
        if unk_line and unk_line.startswith("warning"):  # the summary has the count; above 0.1% say so
            print(unk_line, flush=True)
        if prepared:
            print(f"finetune: {prepared}", flush=True)
        new = [f"{n} {list(p.shape)}" for n, p in heads.items() if n not in reused]
        print(
            f"finetune: new heads (randomly initialised): {', '.join(new) or 'none'}"
            + (f"; reused from the checkpoint: {', '.join(reused)}" if reused else ""),
            flush=True,
        )
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"finetune: {adapted}; {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / total:.2f}%), device {rt.device} {rt.precision} {rt.threads} threads, "
            f"run dir {rt.run_dir}",
            flush=True,
        )

    meta = checkpoint_meta(cfg, model_cfg, tokenizer)
    meta.update(init_from=str(loaded.path), task=task_meta(task), **compressed.checkpoint_record(cfg, loaded))
    if cfg.finetune.lora.r > 0:
        meta["lora"] = {**dataclasses.asdict(cfg.finetune.lora), "merged": False}
        _check_resumable(cfg, rt.run_dir)
    compressed.check_resumable(cfg, rt.run_dir)
    logger = MetricsLogger(rt.run_dir, cfg.logger, config_dict(cfg), enabled=rt.is_main)
    model.to(rt.device)
    before = None
    if cfg.trainer.resume == "never" or not ckpt.list_checkpoints(rt.run_dir / "checkpoints"):
        before = task.val_loss(model, rt.device, cfg.trainer.eval_batches)
    trainer = Trainer(cfg, rt, model, task, logger, meta)  # loads and checks the resume checkpoint
    # Every check has passed: from here on the run directory is written.
    run_dir.begin(trainer.step if trainer.resumed_from is not None else None)
    if rt.is_main:
        write_run_files(rt.run_dir, cfg)
        task.write_files(rt.run_dir)
    try:
        logger.open()
        if before is not None:
            logger.log({"val/loss": before}, 0)
            if rt.is_main:
                print(f"finetune: val/loss before training {before:.4f}", flush=True)
        with prune.enforce(model):  # pruned weights stay zero after every optimizer step
            result = trainer.fit()
        if result.interrupted:  # the merged save and the task metrics are left to the resumed run
            raise result.interruption(rt.run_dir)
        if cfg.finetune.lora.r > 0:
            _save_merged(trainer, model, meta, result.metrics)  # collective: every rank
        if cfg.finetune.qat:
            result.checkpoint = compressed.finish_qat(cfg, trainer, model, meta, result.metrics) or result.checkpoint
        # Under FSDP every forward is a collective: every rank runs the same evaluation, rank 0 logs it.
        sharded = trainer.strategy == "fsdp"
        if not rt.is_main and not sharded:
            return result.metrics.get(cfg.optimize_metric)
        if rt.is_main:
            print(f"finetune: evaluating the {cfg.task.name} task on the validation set", flush=True)
        with root_unsharded(trainer.loss_module):
            task_metrics = task.evaluate(model, rt.device, cfg.eval.max_examples)
        if not rt.is_main:
            return result.metrics.get(cfg.optimize_metric)
        # One value per name at a step: what the trainer's validation pass logged at this step
        # (e.g. val/accuracy) is not logged again.
        metrics = {f"val/{k}": v for k, v in task_metrics.items() if f"val/{k}" not in result.metrics}
        logger.log(metrics, result.step)
    finally:
        logger.close()
    shown = ", ".join(f"{k} {v:.4f}" for k, v in {**result.metrics, **metrics}.items())
    print(f"done at step {result.step}: {shown}; checkpoint {result.checkpoint}", flush=True)
    for where, hyp, refs in getattr(task, "samples", [])[:3]:
        print(f"  {where}\n    generated: {hyp[:200]!r}\n    reference: {refs[0][:200]!r}", flush=True)
    return {**result.metrics, **metrics}.get(cfg.optimize_metric)


def _check_tokenizer(cfg: RunConfig, loaded: Loaded) -> None:
    tok = loaded.tokenizer
    chosen = [o for o in hydra_overrides() if o.lstrip("+~").startswith("tokenizer")]
    if chosen and cfg.tokenizer.name != tok.name:
        raise UserError(
            f"tokenizer={cfg.tokenizer.name} differs from the checkpoint's tokenizer ({tok.name}, "
            f"{loaded.path}); fine-tuning always uses the checkpoint's tokenizer"
        )
    if tok.vocab_size > loaded.model_cfg.vocab_size:
        raise UserError(
            f"checkpoint {loaded.path}: its tokenizer has {tok.vocab_size} tokens but the model "
            f"only {loaded.model_cfg.vocab_size} embeddings (tokenizer/vocab mismatch)"
        )


def _init_heads(model, backbone, init_state) -> tuple[dict[str, torch.nn.Parameter], list[str]]:
    """The task model's parameters outside the backbone; those the init checkpoint has with the
    same name and shape (an earlier fine-tune of the same task) are copied from it."""
    inside = {id(p) for p in backbone.parameters()}
    heads = {n: p for n, p in model.named_parameters() if id(p) not in inside}
    reused = []
    with torch.no_grad():
        for n, p in heads.items():
            if n in init_state and init_state[n].shape == p.shape:
                p.copy_(init_state[n])
                reused.append(n)
    return heads, reused


def _setup_method(cfg: RunConfig, model, backbone, heads) -> str:
    ft = cfg.finetune
    if ft.lora.r > 0:
        if cfg.trainer.strategy == "fsdp":
            raise UserError("finetune.lora.r > 0 is not supported with trainer.strategy=fsdp (use ddp)")
        if ft.freeze_backbone:
            raise UserError("finetune.freeze_backbone=true and finetune.lora.r > 0 exclude each other")
        wrapped = apply_lora(model, ft.lora)
        for p in heads.values():  # new heads are trained in full
            p.requires_grad_(True)
        return (
            f"LoRA r={ft.lora.r} alpha={ft.lora.alpha} on {len(wrapped)} layers "
            f"({', '.join(wrapped[:4])}{', ...' if len(wrapped) > 4 else ''})"
        )
    if ft.freeze_backbone:
        if not heads:
            raise UserError(f"finetune.freeze_backbone=true but task={cfg.task.name} adds no head to train")
        for p in backbone.parameters():
            p.requires_grad_(False)
        return "frozen backbone, training the head only"
    return "full fine-tuning"


def _check_resumable(cfg: RunConfig, run_dir) -> None:
    # the checkpoint resume would take (the newest that verifies), not merely the newest: a
    # corrupt newer one is skipped there, so it must not stop the run here
    if cfg.trainer.resume != "auto":
        return
    last = ckpt.newest_intact(run_dir / "checkpoints", main=False)
    if last is not None and (ckpt.load_meta(last).get("lora") or {}).get("merged"):
        raise UserError(
            f"{last} is the merged final checkpoint of a finished LoRA run; "
            "nothing to resume (start a new run with init_from=it)"
        )


def _save_merged(trainer: Trainer, model, meta: dict, metrics: dict) -> None:
    """Replace the final LoRA checkpoint by merged weights; keep what was trained (adapters and
    heads) on its own in adapter.safetensors."""
    trained = lora_state_dict(model)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    trained.update(
        {
            n: t.detach().cpu().contiguous()
            for n, t in model.state_dict().items()
            if n in trainable_names and n not in trained
        }
    )
    merge_lora(model)
    meta["lora"]["merged"] = True
    meta["adapter"] = ADAPTER
    trainer.meta = meta
    final = trainer.save(metrics)  # same step: atomically replaces the directory
    if final is None:  # not rank 0
        return
    ckpt.add_file(final, ADAPTER, trained, {"format": "llmtrain-lora-v1"})  # recorded in meta.json, verified
