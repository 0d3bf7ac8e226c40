"""Typed per-stage config: old flat spellings are refused with one line naming the new key, the
new keys work, and checkpoints saved with the old `options` dicts and dead keys still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import assert_user_error, run_cli
from llmtrain.config.moved_keys import known_fields, moved_key_error, new_key
from llmtrain.config.schema import DataConfig, ModelConfig, TaskConfig, TrainerConfig

OLD_TO_NEW = [  # (stage, old override, new key)
    ("generate", "prompt=ROMEO:", "generate.prompt"),
    ("generate", "+prompt=ROMEO:", "generate.prompt"),
    ("generate", "++prompt=x", "generate.prompt"),
    ("generate", "num_samples=2", "generate.num_samples"),
    ("generate", "max_new_tokens=5", "generate.max_new_tokens"),
    ("generate", "temperature=0.5", "generate.temperature"),
    ("generate", "top_k=5", "generate.top_k"),
    ("generate", "top_p=0.9", "generate.top_p"),
    ("chat", "max_new_tokens=5", "chat.max_new_tokens"),
    ("chat", "temperature=1.0", "chat.temperature"),
    ("chat", "top_k=null", "chat.top_k"),
    ("chat", "top_p=0.9", "chat.top_p"),
    ("chat", "task.chat_template=chatml", "chat.template"),
    ("evaluate", "temperature=0.5", "eval.temperature"),
    ("export", "out=exports/x", "export.out"),
    ("export", "format=hf", "export.format"),
    ("finetune", "task.options.null_threshold=0.5", "task.null_threshold"),
    ("finetune", "+task.options.prompt_suffix=x", "task.prompt_suffix"),
    ("evaluate", "eval.options.stop=[x]", "eval.stop"),
    ("evaluate", "eval.options.prompt_format={source}", "eval.prompt_format"),
]


@pytest.mark.parametrize("stage,override,new", OLD_TO_NEW)
def test_old_spelling_names_the_new_key(stage, override, new):
    key = override.split("=", 1)[0].lstrip("+")
    assert moved_key_error(stage, ["trainer.seed=1", override]) == f"{key!r} is now {new!r}"


def test_new_keys_and_stage_keys_elsewhere_are_not_refused():
    assert moved_key_error("generate", ["generate.prompt=x", "generate.top_k=3", "hydra.run.dir=d"]) is None
    assert moved_key_error("export", ["export.out=x", "bench.out=y"]) is None
    assert new_key("finetune", "task.chat_template") is None  # the instruction task's own key
    for dead in ("data.name=text", "data.num_workers=2", "trainer.sample_every=5", "+extra.a=1"):
        assert "was removed" in moved_key_error("pretrain", [dead]), dead


@pytest.mark.parametrize(
    "stage,override,new",
    [
        ("generate", "prompt=ROMEO:", "generate.prompt"),
        ("generate", "+prompt=ROMEO:", "generate.prompt"),
        ("generate", "num_samples=2", "generate.num_samples"),
        ("chat", "temperature=1.0", "chat.temperature"),
        ("chat", "task.chat_template=chatml", "chat.template"),
        ("export", "out=exports/x", "export.out"),
        ("export", "format=hf", "export.format"),
        ("finetune", "task.options.null_threshold=0.5", "task.null_threshold"),
        ("evaluate", "eval.options.stop=[x]", "eval.stop"),
    ],
)
def test_cli_refuses_old_spelling_before_writing(tmp_path, stage, override, new):
    run = tmp_path / "run"
    key = override.split("=", 1)[0].lstrip("+")
    assert_user_error(run_cli(stage, "checkpoint=nowhere", override, f"hydra.run.dir={run}"), f"'{key}' is now '{new}'")
    assert not run.exists()


def test_typed_task_and_eval_fields_compose():
    proc = run_cli(
        "finetune",
        "task=extractive_qa",
        "task.train_path=squad.json",
        "task.null_threshold=0.5",
        "eval.stop=[END]",
        "--cfg",
        "job",
    )
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["task"]["null_threshold"] == 0.5 and cfg["eval"]["stop"] == ["END"]
    assert "options" not in cfg["task"] and "options" not in cfg["eval"] and "extra" not in cfg
    assert "prompt" not in cfg and cfg["generate"]["prompt"] == "\n" and cfg["export"]["format"] == "hf"
    assert cfg["chat"]["max_new_tokens"] == 128 and cfg["chat"]["template"] is None  # chat's own defaults


def test_summarization_prompt_suffix_and_all_targets_are_typed(tmp_path):
    from llmtrain.tasks import build_task
    from llmtrain.tokenizers.char import CharTokenizer

    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps({"source": f"text number {i}", "target": ["one", "two"]}) + "\n" for i in range(4)))
    tok = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
    mc = ModelConfig(name="gpt2", n_layer=1, n_head=2, d_model=16, vocab_size=128, max_seq_len=128)
    cfg = TaskConfig(name="summarization", train_path=str(f), val_path=str(f), prompt_suffix=" => ", all_targets=True)
    task = build_task(cfg, tok, mc, DataConfig(seq_len=48, batch_size=2))
    assert len(task.train_examples()) == 8 and len(task.val_examples()) == 4  # every target trains, first validates
    assert all(tok.decode(e["prompt"]).endswith(" => ") for e in task.val_examples())


def test_generate_num_samples_and_chat_template(pretrained, tmp_path):
    proc = run_cli(
        "generate",
        f"checkpoint={pretrained}",
        "generate.prompt=ROMEO:",
        "generate.num_samples=2",
        "generate.max_new_tokens=5",
        f"hydra.run.dir={tmp_path / 'g'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- sample") == 2 and "2 samples" in proc.stderr
    proc = run_cli(
        "chat",
        f"checkpoint={pretrained}",
        "chat.template=chatml",
        "chat.max_new_tokens=3",
        f"hydra.run.dir={tmp_path / 'c'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "(template chatml)" in proc.stderr


def test_stored_options_and_dead_keys_are_read_as_typed_fields():
    saved = {
        "name": "summarization",
        "packing": True,
        "options": {"prompt_suffix": " => ", "all_targets": True, "no_longer_a_key": 1},
    }
    cfg = TaskConfig(**known_fields(TaskConfig, saved))
    assert (cfg.prompt_suffix, cfg.all_targets, cfg.packing) == (" => ", True, True)
    data = {"name": "text", "path": "x.txt", "val_path": None, "num_workers": 4, "seq_len": 16}
    assert DataConfig(**known_fields(DataConfig, data)) == DataConfig(path="x.txt", seq_len=16)
    assert TrainerConfig(**known_fields(TrainerConfig, {"sample_every": 5, "max_steps": 3})).max_steps == 3


def _old_style(run: Path, dest: Path) -> Path:
    """A copy of a checkpoint whose meta.json looks like one saved before the typed config: an
    untyped task `options` dict, dead data/trainer keys and `extra`."""
    ck = sorted((run / "checkpoints").glob("step_*"))[-1]
    shutil.copytree(ck, dest)
    meta = json.loads((dest / "meta.json").read_text())
    config = meta.setdefault("config", {})
    config.setdefault("data", {}).update(name="text", val_path=None, num_workers=0)
    config.setdefault("trainer", {})["sample_every"] = 0
    config.update(extra={}, prompt="\n", temperature=0.8, out=None, format="hf")
    meta["task"] = {"config": {"name": "lm", "options": {"max_new_tokens": 8}}, "state": {}}
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def test_checkpoint_with_old_config_loads(pretrained, tmp_path):
    from llmtrain import checkpoints

    ck = _old_style(pretrained, tmp_path / "old")
    assert checkpoints.load(str(ck)).task.cfg.max_new_tokens == 8
    proc = run_cli("evaluate", f"checkpoint={ck}", "trainer.eval_batches=2", f"hydra.run.dir={tmp_path / 'ev'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["val/loss"] > 0
    proc = run_cli("export", f"checkpoint={ck}", f"export.out={tmp_path / 'hf'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "hf" / "config.json").exists()
