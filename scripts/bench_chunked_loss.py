"""Peak memory and step time of a training step with the plain and the chunked LM-head loss.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_chunked_loss.py --tally     # gpt2_124m, 4 x 512, vocab 50304
    .venv/bin/python scripts/bench_chunked_loss.py --model gpt_tiny --batch 2 --seq 32 --rounds 1 --tally

One step is the trainer's (train/trainer.py) for clm: forward through the blocks, the clm loss
(`objectives.chunked_ce.lm_loss`: plain is trainer.chunked_loss=false, chunked is true, deferred
adds trainer.defer_head_grad=true, the head weight's gradient formed at the end of the backward),
backward, the gradient clip, the optimizer that `train.optim.build_optimizer` builds for
optim=adamw on CPU (`--fused` overrides optim.fused) and zero_grad(set_to_none=True). Only the loss
path differs between the variants.

Each measurement is its own child process, and the children alternate (plain, chunked, deferred,
plain, ...), so load from other jobs hits each alike:
- RSS children: peak RSS (ru_maxrss) after the first backward (forward + backward, before the
  optimizer ever ran) and at the end (every step, AdamW's state included); process CPU seconds
  per step (the first step, which creates the optimizer state, is untimed when --steps > 1).
- with --tally, one profiled child per variant (torch.profiler, profile_memory): the exact bytes
  of live tensors over every step, by category (parameters, optimizer state, gradients,
  activations, temporaries), at each step's peak, with the phase and the op it falls in and the
  largest tensors alive then. RSS adds the allocator's free-but-kept pages to this.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("forward", "loss", "backward", "optimizer")


def build(a):
    import torch
    import yaml

    from llmtrain.config.schema import ModelConfig, OptimConfig
    from llmtrain.models import build_model
    from llmtrain.train.optim import build_optimizer

    torch.manual_seed(0)
    preset = yaml.safe_load((ROOT / "llmtrain/conf/model" / f"{a.model}.yaml").read_text())
    cfg = ModelConfig(**{**preset, "max_seq_len": max(a.seq, preset.get("max_seq_len", 0))})
    cfg.vocab_size = cfg.vocab_size or a.vocab
    model = build_model(cfg)
    if a.variant == "deferred":
        from llmtrain.objectives.chunked_ce import defer_head_gradient

        defer_head_gradient(model)  # as the trainer does with trainer.defer_head_grad=true
    ocfg = OptimConfig(lr=1e-4, fused={"auto": None, "true": True, "false": False}[a.fused])
    opt = build_optimizer(model, ocfg, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (a.batch, a.seq + 1), generator=g)
    return model, opt, ocfg, x


def train_step(model, opt, ocfg, x, chunked: bool, phase) -> float:
    """The trainer's step (fit + _step_optimizer, one micro-batch, fp32 on CPU); `phase(name)`
    is a context manager around each part."""
    import torch

    from llmtrain.objectives.chunked_ce import lm_loss

    with phase("forward"):
        hidden = model.encode(x[:, :-1])
    with phase("loss"):
        loss, _ = lm_loss(model, hidden, x[:, 1:], chunked)
    del hidden
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip if ocfg.grad_clip > 0 else float("inf"))
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def rss_child(a) -> None:
    import contextlib

    model, opt, ocfg, x = build(a)
    cpu, wall, losses, fwd_bwd = [], [], [], None

    @contextlib.contextmanager
    def phase(name):
        yield
        nonlocal fwd_bwd
        if name == "backward" and fwd_bwd is None:  # the high-water mark before the optimizer first ran
            fwd_bwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    for _ in range(a.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        losses.append(train_step(model, opt, ocfg, x, a.variant != "plain", phase))
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB
    out = {"peak_gb": peak, "fwd_bwd_peak_gb": fwd_bwd, "base_gb": base, "cpu_s": cpu[1:] or cpu}
    print(json.dumps({**out, "wall_s": wall[1:] or wall, "losses": losses, "optimizer": describe(opt)}))


def describe(opt) -> str:
    d = opt.defaults
    return f"{type(opt).__name__}(" + ("fused" if d.get("fused") else "foreach" if d.get("foreach") else "for") + ")"


def tally_child(a) -> None:
    """Exact live tensor bytes over the steps, from the profiler's memory timeline."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.profiler._memory_profiler import Action, TensorKey

    model, opt, ocfg, x = build(a)
    acts = [ProfilerActivity.CPU]
    with profile(activities=acts, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for i in range(a.steps):
            train_step(
                model, opt, ocfg, x, a.variant != "plain", lambda name, i=i: record_function(f"phase:{i}:{name}")
            )
    mp = prof._memory_profile()
    # phase and op intervals (ns, the timeline's clock)
    spans, ops = [], []

    todo = [(r, 0) for r in prof.profiler.kineto_results.experimental_event_tree()]
    while todo:
        node, depth = todo.pop()
        todo.extend((c, depth + 1) for c in node.children)
        try:
            name = node.name
        except UnicodeDecodeError:  # some Python frames' names
            continue
        if name.startswith("phase:"):
            _, s, name = name.split(":")
            spans.append((node.start_time_ns, node.end_time_ns, int(s), name))
        elif name.startswith(("aten::", "autograd::")) or "Backward" in name:
            ops.append((node.start_time_ns, node.end_time_ns, depth, name))
    spans.sort()

    def span(t):
        return next(((st, nm) for t0, t1, st, nm in spans if t0 <= t <= t1), (None, None))

    def ops_at(t):  # outermost first
        return [o[3] for o in sorted((o for o in ops if o[0] <= t <= o[1]), key=lambda o: o[2])]

    live: dict = {}
    total = 0
    peaks: dict = {}  # step -> record at its peak
    phase_peak: dict = collections.defaultdict(int)
    cpu = torch.device("cpu")
    for t, action, (key, version), nbytes in mp.timeline:
        if key.device != cpu:
            continue
        cat = mp._categories.get(key, version) if isinstance(key, TensorKey) else None
        name = cat.name.lower() if cat is not None else "unknown"
        if action in (Action.PREEXISTING, Action.CREATE):
            live[(key, version)] = (nbytes, name)
            total += nbytes
        elif action == Action.INCREMENT_VERSION:
            nb, _ = live.pop((key, version), (nbytes, name))
            cat2 = mp._categories.get(key, version + 1) if isinstance(key, TensorKey) else None
            live[(key, version + 1)] = (nb, cat2.name.lower() if cat2 is not None else "unknown")
        elif action == Action.DESTROY:
            nb, _ = live.pop((key, version), (nbytes, name))
            total -= nb
        if t < 0:
            continue
        step, ph = span(t)
        if step is None:
            continue
        phase_peak[f"{step}:{ph}"] = max(phase_peak[f"{step}:{ph}"], total)
        if total > peaks.get(step, {}).get("bytes", -1):
            by_cat = collections.Counter()
            for nb, c in live.values():
                by_cat[c] += nb
            big = sorted(live.values(), key=lambda v: -v[0])[:6]
            peaks[step] = {
                "bytes": total,
                "phase": ph,
                "ops": ops_at(t),
                "by_category": dict(by_cat),
                "largest": [[nb, c] for nb, c in big],
            }
    print(json.dumps({"peaks": {str(k): v for k, v in peaks.items()}, "phase_peak": phase_peak}))


def gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2_124m")
    ap.add_argument("--vocab", type=int, default=50304, help="for presets without a fixed vocab_size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="RSS children per variant (0: none)")
    ap.add_argument(
        "--fused", choices=["auto", "true", "false"], default="auto", help="optim.fused (auto: as the trainer)"
    )
    ap.add_argument("--tally", action="store_true", help="also one profiled child per variant: exact live bytes")
    ap.add_argument("--variant", choices=["plain", "chunked", "deferred"])  # internal: run one child
    ap.add_argument("--mode", choices=["rss", "tally"], default="rss")  # internal
    a = ap.parse_args()
    if a.variant:
        return tally_child(a) if a.mode == "tally" else rss_child(a)
    variants = ("plain", "chunked", "deferred")

    def run(v, mode):
        args = [sys.executable, __file__, "--variant", v, "--mode", mode] + sys.argv[1:]
        out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        return json.loads(out.splitlines()[-1])

    tallies = {}
    if a.tally:
        for v in variants:
            tallies[v] = run(v, "tally")
            print(v, "tally", json.dumps(tallies[v]), flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            runs[v].append(run(v, "rss"))
            print(v, runs[v][-1], flush=True)

    print(f"\n{a.model}, batch {a.batch} x {a.seq}, {platform.processor() or platform.machine()}, fused={a.fused}")
    if tallies:
        print("\nexact live tensor bytes at each step's peak (torch profiler):")
        cols = "params | optimizer state | grads | activations | temporaries | other"
        print(f"| loss | step | peak | phase, op | {cols} |")
        print("| --- " * 10 + "|")
        main_cats = ("parameter", "optimizer_state", "gradient", "activation", "temporary")
        for v, t in tallies.items():
            for step, p in sorted(t["peaks"].items()):
                c = p["by_category"]
                other = sum(b for k, b in c.items() if k not in main_cats)
                cells = " | ".join(gb(c.get(k, 0)) for k in main_cats)
                op = p["ops"][-1] if p["ops"] else ""
                print(f"| {v} | {int(step) + 1} | {gb(p['bytes'])} | {p['phase']}, {op} | {cells} | {gb(other)} |")
        for s in sorted(tallies["plain"]["peaks"]):
            p = tallies["plain"]["peaks"][s]["bytes"]
            for v in variants[1:]:
                c = tallies[v]["peaks"][s]["bytes"]
                print(f"step {int(s) + 1}: exact peak of {v} {100 * (1 - c / p):.1f}% lower")
    if a.rounds:
        print(f"\npeak RSS ({runs['plain'][0]['optimizer']}):")
        print("| loss | peak RSS, whole run | forward+backward (step 1) | CPU s / step | loss |")
        print("| --- | --- | --- | --- | --- |")
        for v, rs in runs.items():
            peak, fb = max(r["peak_gb"] for r in rs), max(r["fwd_bwd_peak_gb"] for r in rs)
            step = statistics.median(t for r in rs for t in r["cpu_s"])
            print(f"| {v} | {peak:.2f} GB | {fb:.2f} GB | {step:.2f} | {rs[0]['losses'][0]:.6f} |")
        p, fp = max(r["peak_gb"] for r in runs["plain"]), max(r["fwd_bwd_peak_gb"] for r in runs["plain"])
        tp = statistics.median(t for r in runs["plain"] for t in r["cpu_s"])
        for v in variants[1:]:
            c, fc = max(r["peak_gb"] for r in runs[v]), max(r["fwd_bwd_peak_gb"] for r in runs[v])
            tc = statistics.median(t for r in runs[v] for t in r["cpu_s"])
            print(
                f"{v}: peak RSS {100 * (1 - c / p):.0f}% lower, of forward+backward {100 * (1 - fc / fp):.0f}% "
                f"lower; CPU time per step x{tc / tp:.3f}"
            )


if __name__ == "__main__":
    main()
