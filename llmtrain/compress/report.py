"""One before/after report for every compressed model (quantize, prune, distill, a recovery
fine-tune): the source model and the compressed one on the same data.

    report = compression_report(source, compressed, cfg, run_dir)   # both llmtrain.checkpoints.Loaded

Rows: parameters, non-zero parameters, bytes of the linear layers and of the weights file on
disk, the checkpoint's own validation metrics (loss / perplexity, or accuracy for classifiers,
through the evaluate tasks of llmtrain/eval/suite.py), and for decoders greedy generation
tokens/s on this machine's CPU with the peak memory. Written to RUN_DIR/compression.json and
compression.md, and printed.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from llmtrain.compress.layout import compression_of
from llmtrain.compress.quant import QuantLinear, linear_bytes
from llmtrain.config.moved_keys import known_fields
from llmtrain.config.schema import DataConfig
from llmtrain.eval.report import format_value
from llmtrain.files import atomic_write
from llmtrain.process_memory import resident_bytes

GEN_TOKENS = 64  # greedy tokens generated for the speed row
ROWS = [
    ("params", "parameters"),
    ("nonzero_params", "non-zero parameters"),
    ("linear_bytes", "linear-layer bytes"),
    ("disk_bytes", "bytes on disk (weights file)"),
    ("gen_tokens_per_s", "generation tokens/s (CPU)"),
    ("peak_mem_bytes", "peak memory, bytes (weights + generation)"),
]


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(weights, non-zero weights), tied tensors once; a quantized layer counts its logical weights."""
    total = nonzero = 0
    seen: set[int] = set()
    for m in model.modules():
        tensors = [m.dequantized()] if isinstance(m, QuantLinear) else []
        tensors += [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in m.parameters(recurse=False))
        for t in tensors:
            total += t.numel()
            nonzero += int(torch.count_nonzero(t.detach()))
    return total, nonzero


def disk_bytes(loaded) -> int | None:
    path = Path(loaded.path)
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) or None


def generation_speed(loaded, tokens: int = GEN_TOKENS) -> dict[str, float]:
    """Greedy generation of `tokens` tokens on the CPU: tokens/s, and the peak memory (the
    model's tensors plus the resident-set growth while generating, sampled every millisecond)."""
    from llmtrain.generation import generate

    model = loaded.model
    tok = loaded.tokenizer
    prompt = tok.encode("\n") or [tok.bos_id]
    tokens = min(tokens, loaded.model_cfg.max_seq_len - len(prompt))
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
    generate(model, [prompt], max_new_tokens=4, temperature=0.0)  # warm-up: first-call allocations
    base, peak, done = resident_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes() - base)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = generate(model, [prompt], max_new_tokens=tokens, temperature=0.0)
    finally:
        done.set()
        watcher.join()
    return {"gen_tokens_per_s": res.tokens_per_second, "peak_mem_bytes": weights + peak[0]}


def _quality(loaded, cfg, run_dir: Path, device) -> dict[str, Any]:
    """The checkpoint's default evaluate tasks (lm loss / ppl, classification accuracy, ...)."""
    from llmtrain.eval.suite import EVAL_TASKS, EvalContext, default_tasks

    ctx = EvalContext(cfg, device, "fp32", run_dir, lambda: loaded)
    out: dict[str, Any] = {}
    for name in default_tasks(loaded.meta):
        out.update({k: v for k, v in EVAL_TASKS[name](ctx).metrics.items() if "/" in k})
    return out


def same_data(cfg, *loaded):
    """cfg with data.path set: the one given, else the first checkpoint's that records one, so
    both models are scored on the same text even when a recovery fine-tune used other data."""
    if cfg.data.path or cfg.data.val_path:
        return cfg
    for ld in loaded:
        saved = (ld.meta.get("config") or {}).get("data") or {}
        if saved.get("path"):
            # the checkpoint's own data is scored on its validation split, as evaluate does
            split = dataclasses.replace(cfg.eval, split=cfg.eval.split or "val")
            return dataclasses.replace(cfg, data=DataConfig(**known_fields(DataConfig, saved)), eval=split)
    return cfg


def measure(loaded, cfg, run_dir: Path, device: torch.device | None = None) -> dict[str, Any]:
    device = device or torch.device("cpu")
    loaded.model.to(device).eval()
    params, nonzero = param_counts(loaded.model)
    row: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "params": params,
        "nonzero_params": nonzero,
        "linear_bytes": linear_bytes(loaded.model),
        "disk_bytes": disk_bytes(loaded),
    }
    with torch.inference_mode():
        row.update(_quality(loaded, cfg, run_dir, device))
        if getattr(loaded.model, "is_decoder", False) and device.type == "cpu":
            row.update(generation_speed(loaded))
    return row


def compression_report(
    source, compressed, cfg, run_dir: str | Path, device: torch.device | None = None
) -> dict[str, Any]:
    """Measure both models on the same data (cfg's data / task keys, else the compressed checkpoint's),
    write compression.json and compression.md to run_dir, print the table; returns the report."""
    run_dir = Path(run_dir)
    cfg = same_data(cfg, compressed, source)
    before = measure(source, cfg, run_dir, device)
    after = measure(compressed, cfg, run_dir, device)
    ratios = {
        k: before[k] / after[k]
        for k in ("params", "nonzero_params", "linear_bytes", "disk_bytes")
        if isinstance(before.get(k), (int, float)) and after.get(k)
    }
    if before.get("gen_tokens_per_s") and after.get("gen_tokens_per_s"):
        ratios["gen_speedup"] = after["gen_tokens_per_s"] / before["gen_tokens_per_s"]
    report = {
        "compression": compression_of(compressed.meta),
        "source": before,
        "compressed": after,
        "ratios": ratios,  # source / compressed for sizes; compressed / source for speed
    }
    atomic_write(run_dir / "compression.json", json.dumps(report, indent=2, default=str) + "\n")
    md = markdown(report)
    atomic_write(run_dir / "compression.md", md)
    print(md, flush=True)
    return report


def _rows(report: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    before, after = report["source"], report["compressed"]
    metric_keys = [k for k in before if "/" in k and k in after]
    rows = [(label, k) for k, label in ROWS if k in before or k in after]
    rows += [(k, k) for k in metric_keys]
    return [(label, key, before.get(key), after.get(key)) for label, key in rows]


def markdown(report: dict[str, Any]) -> str:
    comp = report.get("compression") or {}
    what = comp.get("method") or ", ".join(k for k in comp if k != "source") or "compressed"
    lines = [
        f"# Compression report: {what}",
        "",
        f"- source: `{report['source']['checkpoint']}`",
        f"- compressed: `{report['compressed']['checkpoint']}`",
    ]
    if comp.get("quant"):
        q = comp["quant"]
        lines.append(f"- quantization: {q['method']} ({q['backend']} quantizer), {len(q['layers'])} linear layers")
    lines += ["", "| | source | compressed | change |", "|---|---|---|---|"]
    for label, _, b, a in _rows(report):
        change = ""
        if isinstance(b, (int, float)) and isinstance(a, (int, float)) and b:
            change = f"{100 * (a - b) / abs(b):+.1f}%"
        lines.append(
            f"| {label} | {format_value(b) if b is not None else '-'} | "
            f"{format_value(a) if a is not None else '-'} | {change} |"
        )
    return "\n".join(lines) + "\n"
