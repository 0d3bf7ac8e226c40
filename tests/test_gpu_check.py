"""scripts/gpu_check.sh --cpu-smoke runs every part of the GPU check at tiny sizes on the CPU and
prints its table (the generation part only where scripts/bench_generate.py exists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts the CLI in subprocesses

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {
        r["part"].split(",")[-1].strip() if "bench" in r["part"] else r["part"]: r
        for r in json.loads((tmp_path / "gpu_check.json").read_text())
    }
    for chunked in ("true", "false"):
        r = rows[f"chunked_loss={chunked}"]
        assert "tok/s" in r["result"] and r["peak_mem_gb"] > 0, r
        assert (tmp_path / f"bench_chunked_{chunked}.json").exists()
    for name in ("adamw", "muon"):
        result = rows[f"shakespeare {name}"]["result"]
        assert result.startswith(("val <=", "not reached")), result
        assert (tmp_path / name / "metrics.jsonl").exists()
    gen = rows["generation vs transformers"]["result"]
    if (ROOT / "scripts" / "bench_generate.py").exists():
        assert not gen.startswith(("skipped", "failed")), gen
    else:
        assert gen.startswith("skipped"), gen
    assert "| part | result | peak memory |" in proc.stdout
