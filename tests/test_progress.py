"""What the console shows while a run works: the progress bar from the first step, validation,
and `llmtrain bench` on a model too big for the device."""

from __future__ import annotations

import numpy as np

from llmtrain.config.schema import ModelConfig, RunConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.models import build_model, resolve_model_config
from llmtrain.objectives import build_objective
from llmtrain.runtime import setup_runtime
from llmtrain.stages.bench import cpu_warning
from llmtrain.tokenizers.byte import ByteTokenizer
from llmtrain.train.tracking import MetricsLogger
from llmtrain.train.trainer import Trainer


def test_bar_shows_loss_from_the_first_step_and_says_evaluating(tmp_path, capsys):
    cfg = RunConfig(model=ModelConfig(name="gpt2", n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    cfg.stage = "pretrain"
    cfg.data.seq_len, cfg.data.batch_size = 16, 2
    cfg.trainer.max_steps, cfg.trainer.log_every, cfg.trainer.eval_every = 3, 100, 0
    cfg.trainer.ckpt_every_minutes, cfg.trainer.progress, cfg.trainer.device = 0, True, "cpu"
    tok = ByteTokenizer()
    tokens = np.random.default_rng(0).integers(7, 200, size=4000, dtype=np.uint16)
    splits = TokenSplits(train=tokens, val=tokens[:200], n_docs=1, val_bytes=200)
    model_cfg = resolve_model_config(cfg.model, tok)
    objective = build_objective(cfg.objective, tok, splits, cfg.data, 0)
    rt = setup_runtime(cfg, run_dir=tmp_path)
    logger = MetricsLogger(rt.run_dir, cfg.logger, enabled=False)
    Trainer(cfg, rt, build_model(model_cfg), objective, logger, meta={}).fit()
    err = capsys.readouterr().err
    frames = err.replace("\r", "\n").splitlines()
    # log_every=100: before this, the bar showed no loss until the last step
    assert any("1/3" in f and "loss=" in f and "lr=" in f for f in frames), frames
    assert any("pretrain (evaluating)" in f for f in frames), frames


def test_bench_warns_when_a_preset_is_too_big_for_the_cpu():
    msg = cpu_warning("cpu", first_step_s=20.0, calls=50)
    assert msg and "about 17 minutes" in msg and "bench.steps" in msg
    assert cpu_warning("cpu", first_step_s=0.05, calls=50) is None  # a quick run says nothing
    assert cpu_warning("cuda", first_step_s=20.0, calls=50) is None  # a GPU's first step compiles


def test_console_log_keeps_lines_and_the_last_frame_of_a_bar():
    import io

    from llmtrain.run_records import ConsoleLog

    console, log = io.StringIO(), io.StringIO()
    out = ConsoleLog(console, log)
    for text in ["start\n", "\rbar 1", "\rbar 2", "\r     \r", "step 5: val/loss 1.0\n", "\rbar 3", "\rbar 4", "\n"]:
        out.write(text)
    assert console.getvalue().startswith("start\n\rbar 1")  # the console gets everything
    assert log.getvalue() == "start\nstep 5: val/loss 1.0\nbar 4\n"
