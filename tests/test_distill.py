"""llmtrain distill: the KD loss, the rows it compares (clm, mlm, classification), and the CLI
end to end at tiny size (teacher = the shared `pretrained` fixture), with exact resume."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, TINY, assert_user_error, run_cli
from llmtrain.config import compose, register_configs
from llmtrain.config.schema import DistillConfig, ModelConfig
from llmtrain.errors import UserError
from llmtrain.help import experiments_for
from llmtrain.models import build_model
from llmtrain.objectives.distill import Distillation, kd_loss
from llmtrain.tasks.classification import SequenceClassifier


def test_kd_loss_is_zero_for_equal_logits_and_pulls_the_student_towards_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(6, 11)
    assert kd_loss(teacher.clone(), teacher, 2.0).abs().item() < 1e-6
    student = torch.randn(6, 11, requires_grad=True)
    loss = kd_loss(student, teacher, 2.0)
    assert loss.item() > 0
    loss.backward()
    # d/ds of T^2 KL(p_t || p_s) per row is T (p_s - p_t) / N: positive where the student puts
    # too much mass, so a gradient step moves it towards the teacher.
    expected = 2.0 * (torch.softmax(student.detach() / 2, -1) - torch.softmax(teacher / 2, -1)) / 6
    torch.testing.assert_close(student.grad, expected)
    with torch.no_grad():
        assert kd_loss(student - 0.5 * student.grad, teacher, 2.0) < loss


def test_kd_weights_leave_rows_out():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(kd_loss(s, t, 1.0, w), kd_loss(s[[0, 2]], t[[0, 2]], 1.0))


def _bert(d_model=32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="bert", n_layer=1, n_head=2, d_model=d_model, vocab_size=40, max_seq_len=16)
    return build_model(cfg)


class _Base:  # the base trainee's part the distillation needs: its name and kind
    name, needs_decoder = "mlm", False


def _batch(labels_at=(1, 5, 9)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (2, 8), generator=g)
    labels = torch.full((2, 8), -100)
    flat = labels.view(-1)
    for p in labels_at:
        flat[p] = ids.view(-1)[p]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
        "mlm_positions": torch.tensor(labels_at),
    }


def test_mlm_kd_uses_only_the_masked_positions():
    student, teacher = _bert(32, 0), _bert(48, 1)
    batch = _batch()
    trainee = Distillation(_Base(), "mlm", teacher, DistillConfig(alpha=1.0, temperature=2.0), 40, 32, 48)
    out = trainee.loss(student, batch)
    kd, n = (x.item() for x in out.extras["kd_loss"])
    assert n == 3
    with torch.no_grad():
        s_all = student(batch["input_ids"], batch["attention_mask"]).reshape(-1, 40)
        t_all = teacher(batch["input_ids"], batch["attention_mask"]).reshape(-1, 40)
    pos = batch["mlm_positions"]
    assert kd / n == pytest.approx(kd_loss(s_all[pos], t_all[pos], 2.0).item(), rel=1e-5)
    assert kd / n != pytest.approx(kd_loss(s_all, t_all, 2.0).item(), rel=1e-3)
    torch.testing.assert_close(out.loss, out.extras["kd_loss"][0] / n)  # alpha = 1: KD only
    out.loss.backward()
    assert student.word_emb.weight.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_classifier_kd_compares_the_logits_and_is_zero_against_itself():
    student = SequenceClassifier(_bert(32, 0), 3)
    teacher = SequenceClassifier(_bert(48, 1), 3)
    batch = _batch()
    batch["labels"] = torch.tensor([0, 2])
    base = type("Cls", (), {"name": "classification", "needs_decoder": None})()
    cfg = DistillConfig(alpha=0.3, temperature=1.5)
    out = Distillation(base, "classification", teacher, cfg, 3, 32, 48).loss(student, batch)
    with torch.no_grad():
        s = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        t = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    kd, n = (x.item() for x in out.extras["kd_loss"])
    assert n == 2 and kd / n == pytest.approx(kd_loss(s, t, 1.5).item(), rel=1e-5)
    task = torch.nn.functional.cross_entropy(s, batch["labels"]).item()
    assert out.loss.item() == pytest.approx(0.3 * kd / n + 0.7 * task, rel=1e-5)
    twin = Distillation(base, "classification", copy.deepcopy(student), cfg, 3, 32, 32)
    assert twin.loss(student, batch).extras["kd_loss"][0].item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_state_loss_trains_the_projection_and_vanishes_for_a_copy():
    student = _bert(32, 0)
    trainee = Distillation(_Base(), "mlm", copy.deepcopy(student), DistillConfig(hidden_weight=1.0), 40, 32, 32)
    with torch.no_grad():
        trainee.extra.weight.copy_(torch.eye(32))  # identity projection of an identical model
    out = trainee.loss(student, _batch())
    assert out.extras["hidden_loss"][0].item() == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        trainee.extra.weight.mul_(0.5)
    out = trainee.loss(student, _batch())
    assert out.extras["hidden_loss"][0].item() > 0
    out.loss.backward()
    assert trainee.extra.weight.grad is not None and trainee.extra.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the CLI
STUDENT = [
    *TINY,
    "model.n_layer=1",  # about half the teacher's (gpt_tiny, 2 layers) parameters
    "trainer.max_steps=10",
    "trainer.eval_every=0",
    "trainer.eval_batches=2",
    "trainer.ckpt_every=5",
    "trainer.log_every=5",
    "scheduler.name=constant",
    "scheduler.warmup_steps=0",
    "distill.hidden_weight=0.5",
]


@pytest.fixture(scope="module")
def distilled(pretrained, tmp_path_factory):
    run = tmp_path_factory.mktemp("distilled")
    proc = run_cli("distill", f"teacher={pretrained}", *STUDENT, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc.stdout


def test_distill_runs_end_to_end_and_logs_both_losses(distilled):
    run, stdout = distilled
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert train and all("train/kd_loss" in r and "train/task_loss" in r and "train/hidden_loss" in r for r in train)
    assert any("val/loss" in r and "val/kd_loss" in r for r in records)
    report = json.loads((run / "compression.json").read_text())  # student against teacher
    assert report["compression"]["method"] == "distill"
    assert report["compressed"]["params"] < report["source"]["params"]
    assert "compression.md" in stdout
    final = run / "checkpoints" / "step_0000010"
    weights = load_file(final / "model.safetensors")
    assert "blocks.0.attn.qkv.weight" in weights and not any(k.startswith("blocks.1.") for k in weights)
    # the projection is trained state, not part of the student
    state = torch.load(final / "train_state.pt", weights_only=True)
    assert state["trainee"]["weight"].shape == (64, 64)
    meta = json.loads((final / "meta.json").read_text())
    assert meta["stage"] == "distill" and meta["teacher"]


def test_distill_resumes_bit_exactly(distilled, pretrained, tmp_path):
    run, _ = distilled
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    shutil.rmtree(copy_ / "checkpoints" / "step_0000010")
    proc = run_cli("distill", f"teacher={pretrained}", *STUDENT, "trainer.resume=auto", f"hydra.run.dir={copy_}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(run / "checkpoints" / "step_0000010" / "model.safetensors")
    b = load_file(copy_ / "checkpoints" / "step_0000010" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa = torch.load(run / "checkpoints" / "step_0000010" / "train_state.pt", weights_only=True)["trainee"]
    pb = torch.load(copy_ / "checkpoints" / "step_0000010" / "train_state.pt", weights_only=True)["trainee"]
    assert torch.equal(pa["weight"], pb["weight"])


def test_teacher_with_another_tokenizer_is_refused(pretrained):
    proc = run_cli("distill", f"teacher={pretrained}", *STUDENT, "tokenizer=byte")
    assert_user_error(proc, "teacher=", "tokenizer")


def test_distill_needs_a_teacher_and_checks_its_keys():
    register_configs()
    with compose.hydra_session("distill"):
        with pytest.raises(UserError, match="teacher=PATH"):
            compose.validate(compose.compose_run("distill", STUDENT))
        with pytest.raises(UserError, match="distill.temperature must be > 0"):
            compose.validate(compose.compose_run("distill", [*STUDENT, "teacher=RUN", "distill.temperature=0"]))
        cfg = compose.validate(
            compose.compose_run(
                "distill",
                [*STUDENT, "teacher=RUN", "+experiment=distill_sst2", f"task.train_path={SHARED / 'sst2' / 'dev.tsv'}"],
            )
        )
        assert cfg.task.name == "classification" and cfg.teacher == "RUN"


def test_distill_presets_fit_distill_only():
    assert experiments_for("distill") == ["distill_shakespeare", "distill_sst2"]
    assert not {"distill_shakespeare", "distill_sst2"} & set(experiments_for("pretrain") + experiments_for("finetune"))


def test_distill_under_fsdp_resumes_under_ddp(pretrained, tmp_path):
    # 2 gloo ranks: FSDP for 4 steps, then the same run resumed from its step-2 checkpoint under
    # DDP; the checkpoint is consolidated, so both strategies continue the same computation.
    args = [
        "distill", f"teacher={pretrained}", *[a for a in STUDENT if not a.startswith("distill.hidden_weight")],
        "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.log_every=1", "data.batch_size=4",
        "model.dropout=0.0", "trainer.device=cpu", "trainer.devices=2",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1"}
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    proc = run_cli(*args, "trainer.strategy=fsdp", f"hydra.run.dir={fsdp}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student against teacher" in proc.stdout
    shutil.copytree(fsdp, ddp)
    shutil.rmtree(ddp / "checkpoints" / "step_0000004")
    proc = run_cli(*args, "trainer.strategy=ddp", "trainer.resume=auto", f"hydra.run.dir={ddp}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr

    def logged(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["train/loss"], r["train/kd_loss"]) for r in recs if "train/loss" in r}

    a, b = logged(fsdp), logged(ddp)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a[4][0] < a[1][0]
    assert all(abs(x - y) < 1e-5 for s in a for x, y in zip(a[s], b[s])), (a, b)
    wa, wb = (load_file(r / "checkpoints" / "step_0000004" / "model.safetensors") for r in (fsdp, ddp))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
