"""`llmtrain rl` through the real CLI at tiny size: the grpo_arithmetic recipe end to end
(pretrain on arithmetic -> GRPO -> evaluate), bit-exact resume after kill -9, and rlhf_demo
(rl.reward=model) against a reward model of arithmetic preference pairs. One test, so
pytest-xdist never runs the shared runs twice (module fixtures are per worker)."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from llmtrain import checkpoints
from llmtrain.config.schema import RunConfig
from llmtrain.eval.suite import EvalContext, arithmetic_task
from llmtrain.tasks.arithmetic import preference_pairs
from test_resume import ckpt, popen_cli, wait_for

TINY_LM = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "data.batch_size=8",
    "task.num_train=200",
    "task.num_val=12",
    "trainer.progress=false",
]
STEPS = 24


def rl_args(init: Path, run: Path) -> list[str]:
    return [
        "rl",
        "+experiment=grpo_arithmetic",
        f"init_from={init}",
        "task.num_train=200",
        "task.num_val=12",
        "data.batch_size=2",
        "rl.group_size=4",
        "rl.eval_prompts=0",
        f"trainer.max_steps={STEPS}",
        "trainer.eval_every=8",
        "trainer.log_every=1",
        "trainer.ckpt_every=4",
        "trainer.progress=false",
        "optim.lr=3e-3",
        f"hydra.run.dir={run}",
    ]


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def test_grpo_arithmetic_recipe_resume_after_kill_9_and_rlhf_demo(tmp_path):
    arith_lm = tmp_path / "arith_lm"
    proc = run_cli(
        "pretrain", "+experiment=arithmetic_lm", *TINY_LM, "trainer.max_steps=5", f"hydra.run.dir={arith_lm}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rl_run = tmp_path / "rl"
    proc = run_cli(*rl_args(arith_lm, rl_run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(rl_run)
    train = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("train/reward", "train/kl", "train/response_len"):
        assert all(key in r for r in train), key
    assert 1 <= train[0]["train/response_len"] <= 6  # rl.max_new_tokens of the preset
    assert train[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the first policy is the reference
    # train/tokens counts the sampled completion tokens (2 prompts x 4 a step), not context windows
    sampled = [sum(r["train/response_len"] * 8 for r in train[: i + 1]) for i in range(len(train))]
    assert [r["train/tokens"] for r in train] == pytest.approx(sampled)
    val = [r for r in recs if "val/reward" in r]
    assert [r["step"] for r in val] == [0, 8, 16, 24] and all("val/exact_match" in r for r in val)
    samples = records(rl_run, "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 8, 16, 24]
    assert {"prompt", "response", "reward"} <= set(samples[0]["samples"][0])
    assert (rl_run / "curves.png").exists()

    # evaluate's arithmetic task (in process: one CLI start fewer) on the final checkpoint
    ctx = EvalContext(RunConfig(), torch.device("cpu"), "fp32", tmp_path, lambda: checkpoints.load(rl_run))
    result = arithmetic_task(ctx).metrics
    assert result["arithmetic/examples"] == 12
    # the same greedy answers to the same held-out problems as the run's last validation
    assert result["arithmetic/exact_match"] == pytest.approx(val[-1]["val/exact_match"])

    # kill -9 after the step-8 checkpoint, resume: the same run as the uninterrupted one above
    run = tmp_path / "killed"
    p = popen_cli(*rl_args(arith_lm, run))
    wait_for(lambda: (ckpt(run, 8) / "meta.json").exists(), p)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert max(r["step"] for r in records(run)) < STEPS, "the run finished before it was killed"

    proc = run_cli(*rl_args(arith_lm, run), "trainer.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    # the same rewards, KL and losses at every step, exactly; the same samples at every eval
    assert without_timing(records(run)) == without_timing(records(rl_run))
    assert records(run, "samples.jsonl") == records(rl_run, "samples.jsonl")
    a = load_file(ckpt(run, STEPS) / "model.safetensors")
    b = load_file(ckpt(rl_run, STEPS) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # rl.reward=model (+experiment=rlhf_demo): a reward model trained on arithmetic preference
    # pairs (right vs wrong answer) scores the completions of the pairs' prompts
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(40, seed=0)))
    rm = tmp_path / "rm"
    proc = run_cli(
        "finetune", "+experiment=reward_demo", f"init_from={arith_lm}", f"task.train_path={pairs}",
        "data.seq_len=32", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.progress=false",
        f"hydra.run.dir={rm}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rlhf = tmp_path / "rlhf"
    proc = run_cli(
        "rl", "+experiment=rlhf_demo", f"init_from={arith_lm}", f"rl.reward_model={rm}", f"task.train_path={pairs}",
        "data.seq_len=32", "rl.max_new_tokens=6", "data.batch_size=2", "rl.group_size=2", "rl.eval_prompts=4",
        "trainer.max_steps=2", "trainer.eval_every=2", "trainer.log_every=1", "trainer.progress=false",
        f"hydra.run.dir={rlhf}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(rlhf)
    assert [r["step"] for r in recs if "train/reward" in r] == [1, 2]
    assert [r["step"] for r in recs if "val/reward" in r] == [0, 2]
    assert all(math.isfinite(r["val/reward"]) for r in recs if "val/reward" in r)


def without_timing(recs: list[dict]) -> list[dict]:
    timing = ("train/tokens_per_s", "train/step_time_ms")  # wall-clock figures differ run to run
    return [{k: v for k, v in r.items() if k not in timing} for r in recs]
