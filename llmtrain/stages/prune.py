"""prune: zero or remove weights of a checkpoint's transformer blocks -> a pruned checkpoint.

    llmtrain prune checkpoint=RUN prune.method=magnitude prune.sparsity=0.5 [prune.scope=layer]
    llmtrain prune checkpoint=RUN prune.method=2:4
    llmtrain prune checkpoint=RUN prune.method=structured prune.sparsity=0.25   # a smaller model

Masks (magnitude, 2:4) are `weight_mask` tensors in the checkpoint's weights; a recovery
`llmtrain finetune init_from=THIS_RUN` keeps the pruned weights at zero (llmtrain/compress/prune.py).
Structured pruning writes a smaller config (fewer heads, a smaller d_ff) that loads and exports
like any model. The before/after report goes to compression.json / compression.md.
"""

from __future__ import annotations

from llmtrain.compress import prune
from llmtrain.compress.calibration import forward_passes, trainee_of
from llmtrain.compress.layout import compressed_meta
from llmtrain.compress.one_shot import CPU, check_one_shot, load_source, report_metric
from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.run_records import write_run_files
from llmtrain.runtime import setup_runtime
from llmtrain.train import checkpoint as ckpt

SCOPES = ("global", "layer")
STRUCTURED = ("gpt2", "llama", "bert")


def run(cfg: RunConfig) -> float | None:
    p = cfg.prune
    check_one_shot(cfg, "prune")
    if p.method not in prune.METHODS:
        raise UserError(f"prune.method={p.method!r} is not one of {', '.join(prune.METHODS)}")
    if p.scope not in SCOPES:
        raise UserError(f"prune.scope={p.scope!r} is not one of {', '.join(SCOPES)}")
    rt = setup_runtime(cfg)
    source, model = load_source(cfg)
    if "quant" in (source.meta.get("compression") or {}):
        raise UserError(f"checkpoint {source.path} is quantized; prune the full-precision checkpoint first")
    model_cfg = source.model_cfg
    record: dict = {"method": p.method}
    if p.method == "structured":
        if model_cfg.name not in STRUCTURED:  # t5's cross-attention shares n_head with the pruned self-attention
            raise UserError(
                f"prune.method=structured supports {', '.join(STRUCTURED)} models, not {model_cfg.name} "
                "(use prune.method=magnitude or 2:4)"
            )
        energy = prune.input_energy(model, forward_passes(model, trainee_of(source, cfg), p.calibration, CPU))
        plan = prune.structured_plan(model, energy, p.sparsity, heads=p.heads)
        model_cfg = prune.apply_structured(model, plan, model_cfg)
        record.update(fraction=p.sparsity, heads=p.heads, calibration_batches=p.calibration)
        d_ff = source.backbone.blocks[0].mlp.proj.in_features
        done = f"n_head {source.model_cfg.n_head} -> {model_cfg.n_head}, d_ff {d_ff} -> {model_cfg.d_ff}"
    else:
        if p.method == "magnitude":
            masks = prune.magnitude_masks(model, p.sparsity, p.scope)
            record.update(sparsity=p.sparsity, scope=p.scope)
        else:
            masks = prune.semi_structured_masks(model, 2, 4)
        prune.attach(model, masks)
        record["layers"] = sorted(masks)
        done = f"{len(masks)} layers masked"
    record["sparsity_after"] = prune.sparsity_of(model)
    meta = compressed_meta(source.meta, source.path, model_cfg, f"prune {p.method}", prune=record)
    path = ckpt.save_checkpoint(rt.run_dir / "checkpoints", int(source.meta.get("step") or 0), model, meta)
    write_run_files(rt.run_dir, cfg)
    print(
        f"prune: {p.method}, {done}, {100 * record['sparsity_after']:.1f}% of block weights zero -> {path}", flush=True
    )
    return report_metric(cfg, source, path, rt.run_dir, p.report)
