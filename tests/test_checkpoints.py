"""The one checkpoint loader (llmtrain.checkpoints): every form of path resolves to the same
objects, fine-tuned and LoRA checkpoints come back as their task models, hf: directories too."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_cli, sst2_split
from llmtrain import checkpoints
from llmtrain.errors import UserError
from llmtrain.models.lora import LoRALinear
from llmtrain.train import checkpoint as ckpt


def _steps(run_dir):
    return [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_path_form_of_a_pretraining_run(pretrained, tmp_path):
    newest = ckpt.list_checkpoints(pretrained / "checkpoints")[-1]
    by_run = checkpoints.load(pretrained)
    assert by_run.path == newest and by_run.task is None and by_run.backbone is by_run.model
    assert not by_run.model.training  # inference-ready
    for form in (newest, newest / ckpt.WEIGHTS, newest / ckpt.META, str(newest)):
        other = checkpoints.load(form)
        assert other.path == newest and _same_weights(other.model, by_run.model)
    info = checkpoints.read(pretrained)
    assert info.path == newest and info.meta["step"] == by_run.meta["step"]
    assert info.model_cfg == by_run.model_cfg and info.tokenizer.state() == by_run.tokenizer.state()

    # best_checkpoint names the checkpoint it points to, not the newest one
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    older = run / "checkpoints" / "step_0000001"
    shutil.copytree(run / "checkpoints" / newest.name, older)
    meta = json.loads((older / ckpt.META).read_text())
    (older / ckpt.META).write_text(json.dumps({**meta, "step": 1}))
    (run / ckpt.BEST).write_text(f"checkpoints/{older.name}\n")
    assert _steps(run) == [older.name, newest.name]
    assert checkpoints.load(run).path.name == newest.name
    best = checkpoints.load(run / ckpt.BEST)
    assert best.path == older and best.meta["step"] == 1
    (run / ckpt.BEST).write_text("checkpoints/step_9999999\n")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoints.load(run / ckpt.BEST)
    with pytest.raises(UserError, match="checkpoint not found"):
        checkpoints.load(tmp_path / "nope")


def test_lora_run_intermediate_and_final(pretrained, tmp_path):
    """An intermediate LoRA checkpoint holds base weights plus unmerged adapters; the final one
    merged weights. Both load as the task model; merging the intermediate one by hand equals
    what the loader gives."""
    train, dev = sst2_split(tmp_path)
    run = tmp_path / "lora"
    proc = run_cli(
        "finetune",
        f"init_from={pretrained}",
        "task=classification",
        f"task.train_path={train}",
        f"task.val_path={dev}",
        "task.text_field=sentence",
        "data.seq_len=32",
        "data.batch_size=8",
        "finetune.lora.r=4",
        "trainer.max_steps=4",
        "trainer.ckpt_every=2",
        "trainer.keep_last=0",
        "trainer.eval_every=2",
        "trainer.progress=false",
        "optim.lr=1e-2",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    middle, final = ckpt.list_checkpoints(run / "checkpoints")
    assert json.loads((middle / ckpt.META).read_text())["lora"]["merged"] is False
    assert json.loads((final / ckpt.META).read_text())["lora"]["merged"] is True

    merged = checkpoints.load(middle)
    assert merged.task is not None and merged.task.name == "classification"
    assert hasattr(merged.model, "head") and merged.backbone is merged.model.backbone
    assert not any(isinstance(m, LoRALinear) for m in merged.model.modules())
    kept = checkpoints.load(middle, merge=False)
    adapters = [m for m in kept.model.modules() if isinstance(m, LoRALinear)]
    assert adapters and any(bool(m.lora_B.abs().sum()) for m in adapters)  # trained, not zero
    x = torch.randint(0, merged.model_cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(kept.model(x), merged.model(x), atol=1e-5)

    last = checkpoints.load(run)
    assert last.path == final and last.task.labels == ["0", "1"]
    assert not any(isinstance(m, LoRALinear) for m in last.model.modules())


def test_hf_directory_loads_like_a_checkpoint(pretrained, tmp_path):
    pytest.importorskip("transformers")
    from llmtrain.hf.export import export_hf

    ours = checkpoints.load(pretrained)
    out = export_hf(ours, tmp_path / "hf")
    back = checkpoints.load(f"hf:{out}")
    assert isinstance(back, checkpoints.Loaded) and back.task is None and back.path == out
    assert back.meta["format"] == "hf" and back.model_cfg.name == ours.model_cfg.name
    x = torch.randint(0, ours.tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(back.model(x), ours.model(x), atol=1e-5)
    info = checkpoints.read(f"hf:{out}")
    assert info.path == out and info.meta["stage"] == "import"
