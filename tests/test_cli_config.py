"""The CLI composes the real conf/ tree: experiments, overrides, --cfg job, help, bad configs."""

from __future__ import annotations

import yaml

from conftest import ROOT, TINY, assert_user_error, run_cli


def _cfg_job(*args: str) -> dict:
    proc = run_cli("pretrain", *args, "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_help_lists_subcommands_and_presets():
    top = run_cli("--help")
    assert top.returncode == 0
    for verb in ("pretrain", "finetune", "evaluate", "generate"):
        assert verb in top.stdout
    sub = run_cli("pretrain", "--help")
    assert sub.returncode == 0
    assert "gpt_small" in sub.stdout and "gpt_shakespeare" in sub.stdout  # experiments
    assert "gpt2_124m" in sub.stdout  # model presets


def test_experiment_composes_and_overrides_apply():
    cfg = _cfg_job("+experiment=gpt_small", "optim.lr=3e-4", "trainer.max_steps=2000")
    assert cfg["experiment"] == "gpt_small"
    assert cfg["model"]["n_layer"] == 4 and cfg["model"]["d_model"] == 128
    assert cfg["optim"]["lr"] == 3e-4
    assert cfg["trainer"]["max_steps"] == 2000
    assert "hydra" not in cfg  # --cfg job prints the job config only


def test_shakespeare_preset_is_the_nanogpt_recipe():
    cfg = _cfg_job("+experiment=gpt_shakespeare")
    m = cfg["model"]
    assert (m["n_layer"], m["n_head"], m["d_model"], m["max_seq_len"]) == (6, 6, 384, 256)
    assert cfg["data"]["seq_len"] == 256 and cfg["data"]["batch_size"] == 64
    assert m["dropout"] == 0.2


def test_group_choice_and_data_text():
    cfg = _cfg_job("model=gpt2_124m", "data=text", "data.path=/some/file.txt")
    assert cfg["model"]["n_layer"] == 12 and cfg["model"]["vocab_size"] == 50304
    assert cfg["data"]["path"] == "/some/file.txt"


def test_misspelled_key_exits_2():
    assert_user_error(run_cli("pretrain", "optim.lrr=1"), "lrr")


def test_wrong_type_exits_2():
    proc = run_cli("pretrain", "trainer.max_steps=abc")
    assert_user_error(proc, "trainer.max_steps", "'abc'")
    assert "$VALUE" not in proc.stderr  # OmegaConf's unformatted copy of the message is dropped


def test_unknown_experiment_exits_2_with_the_closest_name():
    proc = run_cli("pretrain", "+experiment=gpt_smal")
    assert_user_error(proc, "unknown experiment 'gpt_smal'", "did you mean gpt_small?", "llama_small")
    assert "search path" not in proc.stderr and "provider=" not in proc.stderr


def test_unknown_model_name_exits_2():
    assert_user_error(run_cli("pretrain", "model.name=nope"), "nope", "gpt2")


def test_unknown_model_preset_exits_2():
    assert_user_error(run_cli("pretrain", "model=nope"), "unknown model 'nope'", "gpt2_124m")


def test_unknown_optimizer_and_muon_under_fsdp_exit_2(tmp_path):
    assert_user_error(run_cli("pretrain", "optim.name=sgd"), "optim.name 'sgd'", "adamw, muon")
    run = tmp_path / "run"
    assert_user_error(
        run_cli("pretrain", "optim=muon", "trainer.strategy=fsdp", f"hydra.run.dir={run}"),
        "optim=muon",
        "trainer.strategy=ddp",
    )
    assert not run.exists()  # refused before anything is written


def test_seq_len_longer_than_context_exits_2():
    assert_user_error(run_cli("pretrain", "model=gpt_tiny", "data.seq_len=1000"), "data.seq_len")


def test_bad_config_in_sweep_is_caught_before_any_job(tmp_path):
    proc = run_cli("pretrain", "-m", "optim.lr=1e-3,3e-4", "optim.lrr=1", f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert_user_error(proc, "lrr")
    assert not (tmp_path / "sw").exists()


def test_every_experiment_composes():
    """Each preset fits a training verb (the one its --help lists it under) and composes there."""
    from llmtrain.help import experiments_for

    experiments = sorted(p.stem for p in (ROOT / "llmtrain" / "conf" / "experiment").glob("*.yaml"))
    assert "gpt_small" in experiments
    fits = {v: set(experiments_for(v)) for v in ("pretrain", "finetune", "distill", "rl")}
    for exp in experiments:
        first = (ROOT / "llmtrain" / "conf" / "experiment" / f"{exp}.yaml").read_text().splitlines()[0]
        assert first == "# @package _global_", exp
        stages = [v for v, names in fits.items() if exp in names]
        assert stages, f"{exp} fits no training verb"
        stage = stages[0]
        files = ["data.path=/data/corpus.txt"]
        files += ["task.train_path=/data/train.json"] if stage in ("finetune", "distill") else []
        files += ["teacher=/runs/teacher"] if stage == "distill" else []
        files += ["rl.reward_model=/runs/reward"] if exp == "rlhf_demo" else []  # the preset's one required run
        proc = run_cli(stage, f"+experiment={exp}", *files, "--cfg", "job")
        assert proc.returncode == 0, (exp, proc.stderr)


def test_added_unknown_key_and_out_of_range_value_exit_2_before_any_write(tmp_path):
    run = tmp_path / "run"
    added = run_cli("pretrain", "+optim.lrr=1", f"hydra.run.dir={run}")
    assert_user_error(added, "optim.lrr", "did you mean 'optim.lr'")
    assert_user_error(run_cli("pretrain", "optim.beta2=1", f"hydra.run.dir={run}"), "optim.beta2", "[0, 1)")
    assert not run.exists()


def test_start_up_line_names_the_thread_count(tmp_path):
    proc = run_cli("pretrain", *TINY, "trainer.max_steps=2", "trainer.threads=1", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert " 1 threads, run dir" in proc.stdout, proc.stdout


def test_subword_bert_preset_is_the_sst2_recipe():
    """+experiment=bert_small_subword is run A of docs/benchmarks.md (~79% SST-2 dev accuracy)."""
    from conftest import SHARED
    from llmtrain.config import compose, register_configs

    register_configs()
    with compose.hydra_session("pretrain"):
        overrides = ["+experiment=bert_small_subword", f"data.path={SHARED / 'wikitext2' / 'valid.txt'}"]
        cfg = compose.validate(compose.compose_run("pretrain", overrides))
    assert (cfg.tokenizer.name, cfg.tokenizer.model_type, cfg.tokenizer.vocab_size) == ("sentencepiece", "bpe", 8000)
    assert (cfg.model.name, cfg.model.n_layer, cfg.model.d_model, cfg.objective.name) == ("bert", 4, 128, "mlm_nsp")
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.max_steps, cfg.trainer.eval_batches) == (
        32,
        128,
        1500,
        20,
    )
