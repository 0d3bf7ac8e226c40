"""bench: steady-state speed of the real training step for a preset and batch shape.

    llmtrain bench +experiment=gpt_small bench.steps=50
    llmtrain bench model=gpt2_124m data.seq_len=1024 data.batch_size=12 trainer.compile=true

Synthetic tokens (uniform over the vocabulary) so data loading is not measured. It times
`Trainer.train_step` — the step `pretrain` runs — after `bench.warmup` steps (compilation,
allocator warm-up), synchronising the device around each timed round, and, when
`bench.baseline=true`, a plain PyTorch loop of the same model and batch for comparison; the
two take turns over `bench.rounds` rounds and each reports its best round. The step is each
family's pretraining step: CLM for a decoder, span corruption for an encoder-decoder (t5;
data.seq_len is then the encoder input).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time

import numpy as np
import torch

from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.errors import UserError
from llmtrain.files import atomic_write
from llmtrain.models import build_model, model_class, resolve_model_config
from llmtrain.objectives import build_objective
from llmtrain.runtime import setup_runtime
from llmtrain.tokenizers.byte import ByteTokenizer
from llmtrain.train.device import autocast, peak_flops
from llmtrain.train.optim import adamw_fused
from llmtrain.train.tracking import MetricsLogger
from llmtrain.train.trainer import Trainer, move


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (Linux), process peak RSS


def cpu_warning(device_type: str, first_step_s: float, calls: int) -> str | None:
    """A warning when the steps still to run will take minutes on a CPU (a GPU-sized preset);
    on a GPU the first step includes compilation and says little about the others."""
    left = first_step_s * calls
    if device_type != "cpu" or left < 60:
        return None
    return (
        f"bench: warning: one step took {first_step_s:.1f} s on the CPU; the {calls} steps to go will "
        f"take about {left / 60:.0f} minutes (a preset sized for a GPU? lower bench.steps, "
        "bench.warmup or data.batch_size)"
    )


def _time(fns: dict, steps: int, warmup: int, rounds: int, device: torch.device, show: bool = True) -> dict:
    """Seconds per call of each fn: `warmup` untimed calls each, then `rounds` rounds in which the
    fns take turns at their share of `steps` timed calls; each fn's best round counts. Taking
    turns means a burst of other work on a shared machine slows one round of every contender
    instead of one contender's whole measurement. `show`: a line after the warm-up and each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if show and warmup:
        print(f"bench: warm-up done ({warmup} steps each of {', '.join(fns)})", flush=True)
    sizes = [steps // rounds + (i < steps % rounds) for i in range(rounds)]
    best = {k: float("inf") for k in fns}
    for r, n in enumerate(sizes, 1):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            best[k] = min(best[k], (time.perf_counter() - t0) / n)
        if show:
            shown = ", ".join(f"{k} {1000 * t:.1f} ms/step" for k, t in best.items())
            print(f"bench: round {r}/{rounds} ({n} steps each): best so far {shown}", flush=True)
    return best


def run(cfg: RunConfig) -> float:
    b = cfg.bench
    if b.steps < 1 or b.warmup < 0 or b.rounds < 1:
        raise UserError(
            f"bench.steps and bench.rounds must be >= 1 and bench.warmup >= 0 (got {b.steps}, {b.rounds}, {b.warmup})"
        )
    rt = setup_runtime(cfg)
    tokenizer = ByteTokenizer()  # only its vocabulary size matters for synthetic tokens
    model_cfg = resolve_model_config(cfg.model, tokenizer)
    enc_dec = bool(getattr(model_class(model_cfg.name), "is_encoder_decoder", False))
    total = (b.steps + b.warmup + 1) * cfg.data.batch_size * cfg.trainer.grad_accum * (cfg.data.seq_len + 1)
    rng = np.random.default_rng(cfg.trainer.seed)
    if enc_dec:  # span corruption reads longer raw windows than its input (T5's length rule)
        total *= 2
    tokens = rng.integers(0, min(tokenizer.vocab_size, 2**16), size=max(total, 4 * cfg.data.seq_len), dtype=np.uint16)
    splits = TokenSplits(train=tokens, val=tokens[: 4 * cfg.data.seq_len + 2], n_docs=1, val_bytes=1)
    objective = build_objective(
        dataclasses.replace(cfg.objective, name="span_corruption" if enc_dec else "clm"),
        tokenizer,
        splits,
        cfg.data,
        cfg.trainer.seed,
        model_cfg,
    )

    torch.manual_seed(cfg.trainer.seed)
    model = build_model(model_cfg)
    logger = MetricsLogger(rt.run_dir, cfg.logger, enabled=False)
    trainer = Trainer(cfg, rt, model, objective, logger, meta={})
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    if rt.is_main:
        print(f"bench: {model_cfg.name}, batch {cfg.data.batch_size}x{cfg.data.seq_len} on {rt.device}", flush=True)
    _sync(rt.device)
    t0 = time.perf_counter()
    trainer.train_step()  # the first step allocates everything: peak memory is the trainer's alone
    _sync(rt.device)
    first_step_s = time.perf_counter() - t0
    peak_mem = _peak_mem_gb(rt.device)
    fns = {"llmtrain": trainer.train_step}
    if b.baseline:
        fns["baseline"], baseline_tokens = _baseline(cfg, model_cfg, tokens, rt, objective if enc_dec else None)
    warning = cpu_warning(rt.device.type, first_step_s, (b.steps + b.warmup) * len(fns))
    if warning and rt.is_main:
        print(warning, flush=True)
    rounds = min(b.rounds, b.steps)
    times = _time(fns, b.steps, b.warmup, rounds, rt.device, show=rt.is_main)
    step_s = times["llmtrain"]
    tokens_per_step = trainer.tokens_per_step
    results = {
        "model": model_cfg.name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "grad_accum": cfg.trainer.grad_accum,
        "device": torch.cuda.get_device_name(rt.device)
        if rt.device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "precision": rt.precision,
        "compile": cfg.trainer.compile,
        "steps": b.steps,
        "warmup": b.warmup,
        "step_ms": 1000 * step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "rounds": rounds,
        "peak_mem_gb": peak_mem,
    }
    peak = peak_flops(rt.device)
    if peak:
        results["mfu"] = results["tokens_per_s"] * model.flops_per_token(cfg.data.seq_len) / peak
    if b.baseline:
        results["baseline_step_ms"] = 1000 * times["baseline"]
        results["baseline_tokens_per_s"] = baseline_tokens / times["baseline"]
        results["speedup_vs_baseline"] = results["tokens_per_s"] / results["baseline_tokens_per_s"]

    if rt.is_main:
        out = b.out or str(rt.run_dir / "bench.json")
        atomic_write(out, json.dumps(results, indent=2))
        width = max(len(k) for k in results)
        for k, v in results.items():
            print(f"{k:<{width}}  {v:,.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        print(f"wrote {out}")
    return results["tokens_per_s"]


def _baseline(cfg: RunConfig, model_cfg, tokens: np.ndarray, rt, enc_dec_objective=None):
    """(The textbook loop's step: forward, cross-entropy, backward, AdamW; its tokens per step),
    same model, batch and precision. An encoder-decoder's batch is its objective's first one
    (B x grad_accum rows), fed as (input, decoder input) -> labels."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(model_cfg).to(rt.device)
    # as nanoGPT writes it, the model compiled when trainer.compile is; AdamW fused as the trainer's
    # is (on CUDA, and on CPU where torch has the kernel), so the ratio compares loops, not kernels
    fused = adamw_fused(cfg.optim, rt.device.type)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused)
    if cfg.trainer.compile:
        model = torch.compile(model)
    B, T = cfg.data.batch_size * cfg.trainer.grad_accum, cfg.data.seq_len
    if enc_dec_objective is not None:
        source = enc_dec_objective.train_source()
        parts = [source.batch(i) for i in range(cfg.trainer.grad_accum)]
        batch = move(
            {k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "decoder_input_ids", "labels")}, rt.device
        )

        def forward() -> torch.Tensor:
            return model(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])

        target = batch["labels"]
    else:
        data = torch.from_numpy(tokens[: B * (T + 1)].astype(np.int64)).view(B, T + 1)
        batch = move({"x": data[:, :-1], "y": data[:, 1:]}, rt.device)

        def forward() -> torch.Tensor:
            return model(batch["x"])

        target = batch["y"]

    def step() -> None:
        with autocast(rt.device, rt.precision):
            logits = forward()
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, B * T
