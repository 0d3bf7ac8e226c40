#!/usr/bin/env python
"""Benchmark the training step of several presets and print a Markdown table.

    .venv/bin/python scripts/bench.py --preset gpt_small --steps 20
    .venv/bin/python scripts/bench.py --preset gpt2_124m \
        --extra data.seq_len=1024 data.batch_size=12 trainer.compile=true

Each preset runs `llmtrain bench` (the real trainer step plus a plain PyTorch loop of the same
model) in its own process; results are JSON files under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# preset -> overrides giving the batch shape it is benchmarked at
PRESETS = {
    "gpt_small": ["+experiment=gpt_small"],
    "gpt_shakespeare": ["+experiment=gpt_shakespeare"],
    "llama_small": ["+experiment=llama_small"],
    "gpt2_124m": ["model=gpt2_124m", "data.seq_len=1024", "data.batch_size=12"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable; default gpt_small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every preset")
    ap.add_argument("--out", type=Path, default=None, help="directory for the JSON results")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="llmtrain-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.preset or ["gpt_small"]:
        result = out / f"{preset}.json"
        cmd = [
            sys.executable,
            "-m",
            "llmtrain",
            "bench",
            *PRESETS[preset],
            f"bench.steps={args.steps}",
            f"bench.warmup={args.warmup}",
            f"bench.out={result}",
            f"hydra.run.dir={out / preset}",
            *args.extra,
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        rows.append((preset, json.loads(result.read_text())))
    print("\n| preset | device | batch x seq | step ms | tokens/s | plain loop tokens/s | ratio | MFU | peak mem GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        base = r.get("baseline_tokens_per_s")
        print(
            f"| {preset} | {r['device']} | {r['batch_size']}x{r['seq_len']} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {f'{base:,.0f}' if base else '-'} | "
            f"{r.get('speedup_vs_baseline', float('nan')):.2f}x | {mfu} | {r['peak_mem_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
