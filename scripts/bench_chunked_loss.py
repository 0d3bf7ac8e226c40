"""Peak memory and step time of a training step with the plain and the chunked LM-head loss.

    .venv/bin/python scripts/bench_chunked_loss.py                      # gpt2_124m, 4 x 512, vocab 50304
    .venv/bin/python scripts/bench_chunked_loss.py --model gpt_tiny --batch 2 --seq 32 --rounds 1

One step is what pretrain runs for clm: forward through the blocks, the clm loss
(`objectives.chunked_ce.lm_loss` with trainer.chunked_loss false or true), backward, AdamW.
Each measurement is its own child process, so its peak RSS (ru_maxrss) is that variant's alone;
children alternate (plain, chunked, plain, chunked, ...) so load from other jobs hits both alike.
A child runs `--steps` steps: the first (optimizer state created, allocator warmed) is untimed,
the others are timed (with --steps 1 the one step is timed). Peak RSS is read twice: after the
first backward, before the optimizer ever ran (forward + backward), and at the end (the whole
step, AdamW's state and its temporaries included); "over the model" subtracts the RSS after the
model was built.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_gb() -> float:
    # current RSS from /proc (Linux); ru_maxrss is the peak
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1e9


def child(a) -> None:
    import torch
    import yaml

    from llmtrain.config.schema import ModelConfig
    from llmtrain.models import build_model
    from llmtrain.objectives.chunked_ce import lm_loss

    torch.manual_seed(0)
    preset = yaml.safe_load((ROOT / "llmtrain/conf/model" / f"{a.model}.yaml").read_text())
    cfg = ModelConfig(**{**preset, "max_seq_len": max(a.seq, preset.get("max_seq_len", 0))})
    cfg.vocab_size = cfg.vocab_size or a.vocab
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (a.batch, a.seq + 1), generator=g)
    base = rss_gb()
    times, losses, fwd_bwd = [], [], None
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss, _ = lm_loss(model, model.encode(x[:, :-1]), x[:, 1:], a.variant == "chunked")
        loss.backward()
        # the high-water mark before the optimizer first ran: forward + backward alone
        fwd_bwd = fwd_bwd or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB
    out = {"peak_gb": peak, "fwd_bwd_peak_gb": fwd_bwd, "base_gb": base, "step_s": times[1:] or times}
    print(json.dumps({**out, "losses": losses}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2_124m")
    ap.add_argument("--vocab", type=int, default=50304, help="for presets without a fixed vocab_size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", choices=["plain", "chunked"])  # internal: run one child
    a = ap.parse_args()
    if a.variant:
        return child(a)
    runs: dict[str, list[dict]] = {"plain": [], "chunked": []}
    for _ in range(a.rounds):
        for v in runs:
            args = [sys.executable, __file__, "--variant", v] + sys.argv[1:]
            out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            runs[v].append(json.loads(out.splitlines()[-1]))
            print(v, runs[v][-1], flush=True)
    print(f"\n{a.model}, batch {a.batch} x {a.seq}, {platform.processor() or platform.machine()}")
    print("| loss | peak RSS, step | forward+backward | over the model: step | fwd+bwd | step time | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for v, rs in runs.items():
        peak, fb = max(r["peak_gb"] for r in rs), max(r["fwd_bwd_peak_gb"] for r in rs)
        base = min(r["base_gb"] for r in rs)
        step = statistics.median(t for r in rs for t in r["step_s"])
        print(
            f"| {v} | {peak:.2f} GB | {fb:.2f} GB | {peak - base:.2f} GB | {fb - base:.2f} GB | {step:.2f} s "
            f"| {rs[0]['losses'][0]:.6f} |"
        )
    p, c = (max(r["peak_gb"] for r in runs[v]) for v in runs)
    fp, fc = (max(r["fwd_bwd_peak_gb"] for r in runs[v]) for v in runs)
    tp, tc = (statistics.median(t for r in runs[v] for t in r["step_s"]) for v in runs)
    print(
        f"\npeak RSS of the step {100 * (1 - c / p):.0f}% lower, of forward+backward {100 * (1 - fc / fp):.0f}% "
        f"lower; step time x{tc / tp:.3f}"
    )


if __name__ == "__main__":
    main()
