"""Wall time of a 2-job joblib sweep of `generate`, old code against new, in one script run.

    .venv/bin/python scripts/bench_threads.py --before /path/to/old/checkout --rounds 3

Each round runs, back to back, the same sweep
`llmtrain generate -m hydra/launcher=joblib hydra.launcher.n_jobs=2 trainer.seed=1,2 ...`
with the package from --before, with this checkout (trainer.threads auto), and with this
checkout at trainer.threads=<all cores> (torch's own default, one thread per core per job).
The configurations are interleaved so that load from other processes on a shared machine hits
them alike; the median of the rounds is reported. OMP_NUM_THREADS is removed from the
environment, as for a user who never set it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(pythonpath: Path, *args: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LLMTRAIN_USER_OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(pythonpath)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmtrain", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the code before trainer.threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=600, help="generate.max_new_tokens per job")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    ckpt = work / "ckpt"
    cli(ROOT, "pretrain", "+experiment=gpt_small", "trainer.max_steps=20", "trainer.eval_every=0",
        "trainer.progress=false", f"hydra.run.dir={ckpt}")  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    sweep = ["generate", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.seed=1,2",
             f"checkpoint={ckpt}", f"generate.max_new_tokens={args.tokens}"]  # fmt: skip
    configs = {
        "before (old code)": (args.before, []),
        "after (trainer.threads auto)": (ROOT, []),
        f"after, trainer.threads={cores} (one per core per job)": (ROOT, [f"trainer.threads={cores}"]),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (path, extra) in configs.items():
            times[name].append(cli(path, *sweep, *extra, f"hydra.sweep.dir={work / f'sweep-{r}-{len(times[name])}'}"))
            print(f"round {r + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {cores} usable cores, {args.rounds} rounds, "
          f"{args.tokens} tokens per job")  # fmt: skip
    print("| configuration | median sweep wall time (s) | all rounds (s) |\n| --- | --- | --- |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {', '.join(f'{t:.1f}' for t in ts)} |")


if __name__ == "__main__":
    main()
