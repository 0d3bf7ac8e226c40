"""The parts of scripts/gpu_check.sh (which sets up the environment and runs this); see its header.

python scripts/gpu_check.py [--cpu-smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.47  # nanoGPT's Tiny Shakespeare validation loss

BENCH = ["model=gpt2_124m", "data.seq_len=1024", "data.batch_size=12", "trainer.compile=true", "bench.steps=50"]
SHAKESPEARE = {
    "adamw": ["+experiment=gpt_shakespeare", "trainer.max_steps=2000", "trainer.compile=true"],
    "muon": ["+experiment=gpt_shakespeare", "optim=muon", "trainer.max_steps=1000", "trainer.compile=true"],
}
GENERATE = (
    "--models gpt_small,gpt2_124m,llama_124m --batch 1,8 --prompt-len 64 --new-tokens 256 --device cuda --dtype bf16"
)
RUN_LIMIT_S = 150  # a Shakespeare run that has not reached the target by then is stopped

SMOKE_BENCH = ["model=gpt_tiny", "data.seq_len=32", "data.batch_size=2", "bench.steps=2", "bench.warmup=1"]
SMOKE_BENCH += ["bench.rounds=1", "trainer.device=cpu"]
SMOKE_RUN = ["model=gpt_tiny", "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=4"]
SMOKE_RUN += ["trainer.eval_every=2", "trainer.eval_batches=2", "trainer.device=cpu"]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtrain", *args], cwd=ROOT, text=True, capture_output=True, **kw)


def bench(out: Path, smoke: bool, chunked: str) -> dict:
    path = out / f"bench_chunked_{chunked}.json"
    args = (SMOKE_BENCH if smoke else BENCH) + [f"trainer.chunked_loss={chunked}", f"bench.out={path}"]
    proc = cli("bench", *args, f"hydra.run.dir={out / f'bench_{chunked}'}")
    if proc.returncode:
        return {"part": f"bench chunked_loss={chunked}", "result": f"failed: {proc.stderr.strip()[-300:]}"}
    r = json.loads(path.read_text())
    mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
    return {
        "part": f"bench {r['model']} {r['batch_size']}x{r['seq_len']} {r['precision']}"
        + (" compile" if r["compile"] else "")
        + f", chunked_loss={chunked}",
        "result": f"{r['tokens_per_s']:,.0f} tok/s ({r['step_ms']:.1f} ms){mfu}; plain loop "
        f"{r['baseline_tokens_per_s']:,.0f} tok/s: {r['speedup_vs_baseline']:.3f}x",
        "peak_mem_gb": r["peak_mem_gb"],
    }


def time_to_target(name: str, args: list[str], run_dir: Path) -> dict:
    """Seconds from process start to the first validation line at or below TARGET (the run is then
    stopped), the best validation loss, and the peak memory the trainer logged."""
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "llmtrain", "pretrain", *args, "trainer.progress=false"]
    cmd += ["trainer.eval_on_stop=false", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reached, best, peak = None, float("inf"), None
    while True:
        done = proc.poll() is not None
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        vals = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
        best = min([best] + [v for _, v in vals])
        peaks = [r["train/peak_mem_gb"] for r in rows if "train/peak_mem_gb" in r]
        peak = max(peaks) if peaks else peak
        hit = [s for s, v in vals if v <= TARGET]
        if hit and reached is None:
            reached = (time.perf_counter() - t0, hit[0])
            proc.terminate()
        if done or (reached and proc.poll() is not None):
            break
        if time.perf_counter() - t0 > RUN_LIMIT_S:
            proc.terminate()
            proc.wait()
            break
        time.sleep(0.5)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode not in (0, None, -15, 143) and reached is None:
        return {"part": f"shakespeare {name}", "result": f"failed: {err.strip()[-300:]}"}
    if reached:
        result = f"val <= {TARGET} at step {reached[1]} after {reached[0]:.1f} s (process start)"
    else:
        result = f"not reached in {time.perf_counter() - t0:.0f} s; best val {best:.4f}"
    return {"part": f"shakespeare {name}", "result": result, "peak_mem_gb": peak}


def generation(out: Path, smoke: bool) -> dict:
    script = ROOT / "scripts" / "bench_generate.py"
    if not script.exists():
        return {
            "part": "generation vs transformers",
            "result": "skipped: scripts/bench_generate.py not in this checkout",
        }
    args = ["--smoke", "--device", "cpu"] if smoke else GENERATE.split()
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, text=True, capture_output=True)
    (out / "bench_generate.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        return {"part": "generation vs transformers", "result": f"failed: {proc.stderr.strip()[-300:]}"}
    lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
    return {"part": "generation vs transformers", "result": "see below", "table": lines[-20:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true", help="every part at tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # On the GPU one part at a time (each has the device to itself); the CPU smoke runs them all
    # side by side, since starting the CLI is most of its time.
    parts = [lambda c=c: bench(out, a.cpu_smoke, c) for c in ("true", "false")]
    for name, args in SHAKESPEARE.items():
        if a.cpu_smoke:  # the experiment (and optim=muon) at tiny sizes
            args = [x for x in args if not x.startswith("trainer.")] + SMOKE_RUN
        parts.append(lambda name=name, args=args: time_to_target(name, args, out / name))
    parts.append(lambda: generation(out, a.cpu_smoke))
    with ThreadPoolExecutor(len(parts) if a.cpu_smoke else 1) as pool:
        rows = list(pool.map(lambda part: part(), parts))
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.cpu_smoke else "cpu"
    print(f"\ngpu_check on {device}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s in all")
    print("| part | result | peak memory |")
    print("| --- | --- | --- |")
    for r in rows:
        mem = f"{r['peak_mem_gb']:.2f} GB" if r.get("peak_mem_gb") is not None else ""
        print(f"| {r['part']} | {r['result']} | {mem} |")
    for r in rows:
        if "table" in r:
            print("\n" + "\n".join(r["table"]))
    failed = [r["part"] for r in rows if str(r["result"]).startswith("failed")]
    if failed:
        sys.exit(f"gpu_check: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
