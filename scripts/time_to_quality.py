"""Validation loss of training recipes against the CPU seconds they used, over several seeds.

    .venv/bin/python scripts/time_to_quality.py --seeds 1,2,3 \
        --recipe "adamw=optim=adamw trainer.max_steps=1500" \
        --recipe "muon=optim=muon trainer.max_steps=900"

Each recipe is `NAME=OVERRIDES` on top of `+experiment=gpt_small` (--experiment). Every run is a
`llmtrain pretrain` subprocess with OMP_NUM_THREADS=1; its cost is the process CPU time (user +
system, from wait4), which a busy shared machine changes far less than wall time. Runs of
different recipes take turns (seed 1 of each, then seed 2, ...), so load hits them alike.
Prints a table and writes the per-run records to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(experiment: str, overrides: list[str], seed: int, run_dir: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "llmtrain", "pretrain", f"+experiment={experiment}", *overrides]
    args += [f"trainer.seed={seed}", f"hydra.run.dir={run_dir}", "trainer.progress=false"]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr.read()[-2000:]}")
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {e["step"]: e["val/loss"] for e in evals if "val/loss" in e}
    return {
        "seed": seed,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "val_curve": curve,
        "final_val_loss": curve[max(curve)],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", default="gpt_small")
    ap.add_argument("--recipe", action="append", required=True, help="NAME=OVERRIDES (space separated)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    recipes = dict(r.split("=", 1) for r in a.recipe)
    seeds = [int(s) for s in a.seeds.split(",")]
    results: dict[str, list[dict]] = {name: [] for name in recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, overrides in recipes.items():
                r = run(a.experiment, overrides.split(), seed, Path(tmp) / f"{name}-{seed}")
                results[name].append(r)
                print(
                    f"{name} seed {seed}: val {r['final_val_loss']:.4f}, {r['cpu_s']:.0f} CPU s, "
                    f"{r['wall_s']:.0f} s wall",
                    flush=True,
                )
    print("\n| recipe | overrides | CPU s (mean) | final val loss per seed | mean |")
    print("| --- | --- | --- | --- | --- |")
    for name, rs in results.items():
        losses = [r["final_val_loss"] for r in rs]
        cpu = statistics.mean(r["cpu_s"] for r in rs)
        per_seed = " / ".join(f"{x:.3f}" for x in losses)
        print(f"| {name} | `{recipes[name]}` | {cpu:.0f} | {per_seed} | {statistics.mean(losses):.3f} |")
    if a.out:
        a.out.write_text(json.dumps({"experiment": a.experiment, "recipes": recipes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
