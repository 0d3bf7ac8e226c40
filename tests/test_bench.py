"""`llmtrain bench` times the real trainer step and a plain loop, and writes consistent JSON."""

from __future__ import annotations

import json

from conftest import assert_user_error, run_cli


def test_bench_writes_consistent_results(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench",
        "model=gpt_tiny",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.grad_accum=2",
        "bench.steps=3",
        "bench.warmup=1",
        f"bench.out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert (r["batch_size"], r["seq_len"], r["grad_accum"], r["steps"], r["rounds"]) == (4, 32, 2, 3, 3)
    # tokens/s is the step's tokens over the measured step time (not a separate estimate)
    assert abs(r["tokens_per_s"] - 4 * 32 * 2 / (r["step_ms"] / 1000)) < 1e-6 * r["tokens_per_s"]
    assert (
        abs(r["baseline_tokens_per_s"] - 4 * 2 * 32 / (r["baseline_step_ms"] / 1000))
        < 1e-6 * r["baseline_tokens_per_s"]
    )
    assert abs(r["speedup_vs_baseline"] - r["tokens_per_s"] / r["baseline_tokens_per_s"]) < 1e-9
    assert "mfu" not in r  # no peak FLOPS for a CPU: MFU is not reported
    assert "tokens_per_s" in proc.stdout
    assert "bench: round 3/3 (1 steps each): best so far llmtrain" in proc.stdout  # progress while it runs


def test_bench_rejects_bad_steps(tmp_path):
    assert_user_error(run_cli("bench", "model=gpt_tiny", "bench.steps=0", f"hydra.run.dir={tmp_path}"), "bench.steps")
    assert_user_error(run_cli("bench", "model=gpt_tiny", "bench.rounds=0", f"hydra.run.dir={tmp_path}"), "bench.rounds")
