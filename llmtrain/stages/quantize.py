"""quantize: post-training quantization of a checkpoint's linear layers -> a quantized checkpoint.

    llmtrain quantize checkpoint=RUN quant.method=int8            # weight-only, per channel
    llmtrain quantize checkpoint=RUN quant.method=int4 quant.group_size=64
    llmtrain quantize checkpoint=RUN quant.method=int8_dynamic    # + dynamic int8 activations

The checkpoint goes to RUN_DIR/checkpoints/step_N (the source's step); meta.json["compression"]
records the method and which quantizer ran (torchao or the reference one). evaluate, generate
and chat load it like any checkpoint; export refuses it (transformers has no loader for these
packed layers). The before/after report goes to compression.json / compression.md.
"""

from __future__ import annotations

from llmtrain import checkpoints
from llmtrain.compress import quant
from llmtrain.compress.calibration import forward_passes, trainee_of
from llmtrain.compress.layout import compressed_meta
from llmtrain.compress.one_shot import CPU, check_one_shot, load_source, report_metric
from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.run_records import write_run_files
from llmtrain.runtime import setup_runtime
from llmtrain.train import checkpoint as ckpt


def run(cfg: RunConfig) -> float | None:
    q = cfg.quant
    check_one_shot(cfg, "quantize")
    if q.method not in quant.METHODS:
        raise UserError(f"quant.method={q.method!r} is not one of {', '.join(quant.METHODS)}")
    if q.method == "int4" and q.group_size % 2:
        raise UserError(f"quant.group_size={q.group_size} must be even (two int4 codes per byte)")
    rt = setup_runtime(cfg)
    source, model = load_source(cfg)
    if checkpoints.is_hf(cfg.checkpoint) or "quant" in (source.meta.get("compression") or {}):
        what = "an hf: directory" if checkpoints.is_hf(cfg.checkpoint) else "already quantized"
        raise UserError(f"checkpoint {source.path} is {what}; quantize an llmtrain checkpoint")
    calibrate = None
    if q.method == "int4" and q.calibration > 0:
        calibrate = forward_passes(model, trainee_of(source, cfg), q.calibration, CPU)
    record = quant.quantize_model(model, q.method, q.group_size, calibrate=calibrate)
    record["calibration_batches"] = q.calibration if calibrate else 0
    meta = compressed_meta(source.meta, source.path, source.model_cfg, f"quantize {q.method}", quant=record)
    path = ckpt.save_checkpoint(rt.run_dir / "checkpoints", int(source.meta.get("step") or 0), model, meta)
    write_run_files(rt.run_dir, cfg)
    print(
        f"quantize: {len(record['layers'])} linear layers to {q.method}"
        + (f" (group size {q.group_size})" if q.method == "int4" else "")
        + f" with the {record['backend']} quantizer"
        + (
            f"; left in full precision (input size not a multiple of the group): {', '.join(record['skipped'])}"
            if record["skipped"]
            else ""
        )
        + f" -> {path}",
        flush=True,
    )
    return report_metric(cfg, source, path, rt.run_dir, q.report)
