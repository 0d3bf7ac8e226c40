"""End to end through the CLI: pretrain -> checkpoint -> evaluate / generate / finetune."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SHARED, TINY, assert_user_error, run_cli


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_lowers_loss_and_writes_run_dir(pretrained):
    records = _metrics(pretrained)
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    assert train[0]["step"] == 5 and train[-1]["step"] == 60
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.5
    assert len(val) == 2 and val[-1]["val/loss"] < val[0]["val/loss"]
    assert abs(val[-1]["val/ppl"] - 2.718281828 ** val[-1]["val/loss"]) < 1e-3 * val[-1]["val/ppl"]
    for key in ("train/lr", "train/tokens_per_s", "train/grad_norm"):
        assert key in train[-1]
    assert (pretrained / "config.yaml").is_file() and (pretrained / "run_info.json").is_file()
    # Hydra's record, as Hydra writes it, and the console output in the job log
    hydra_dir = pretrained / ".hydra"
    assert {p.name for p in hydra_dir.iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert "trainer.max_steps=60" in (hydra_dir / "overrides.yaml").read_text()
    assert (
        "job:" in (hydra_dir / "hydra.yaml").read_text() and "max_steps: 60" in (hydra_dir / "config.yaml").read_text()
    )
    log = (pretrained / "pretrain.log").read_text()
    assert "pretrain: gpt2" in log and "step 30: val/loss" in log and "done at step 60" in log
    assert "\r" not in log  # progress-bar redraws are not logged
    ckpts = sorted((pretrained / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_0000060"]
    assert {p.name for p in ckpts[0].iterdir()} == {"model.safetensors", "meta.json", "train_state.pt"}
    meta = json.loads((ckpts[0] / "meta.json").read_text())
    assert meta["step"] == 60 and meta["model"]["name"] == "gpt2" and meta["tokenizer"]["name"] == "char"


def test_same_seed_same_run(pretrained, tmp_path):
    proc = run_cli(
        "pretrain",
        *TINY,
        "trainer.max_steps=60",
        "trainer.eval_every=30",
        "optim.lr=3e-3",
        "scheduler.warmup_steps=10",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr

    def strip(rs):
        return [{k: v for k, v in r.items() if "tokens_per_s" not in k and "step_time" not in k} for r in rs]

    assert strip(_metrics(tmp_path)) == strip(_metrics(pretrained))


def test_evaluate_round_trip(pretrained, tmp_path):
    proc = run_cli("evaluate", f"checkpoint={pretrained}", "trainer.eval_batches=8", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    final_val = [r for r in _metrics(pretrained) if "val/loss" in r][-1]["val/loss"]
    # Same weights, same data and batches: evaluate reproduces the trainer's validation loss.
    assert abs(result["val/loss"] - final_val) < 1e-4
    assert "val/ppl" in proc.stdout and result["val/bits_per_byte"] > 0


def test_evaluate_on_other_text(pretrained, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    proc = run_cli(
        "evaluate",
        f"checkpoint={pretrained}/checkpoints/step_0000060",
        "data=text",
        f"data.path={text}",
        "data.seq_len=32",
        f"hydra.run.dir={tmp_path / 'ev'}",
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert got["data"]["path"] == str(text) and got["data"]["split"] == "all"
    assert got["eval/tokens"] == len(text.read_text())  # every character (and the eos) scored once


def test_generate_samples_text(pretrained, tmp_path):
    proc = run_cli(
        "generate",
        f"checkpoint={pretrained}",
        "generate.prompt=ROMEO:",
        "generate.max_new_tokens=40",
        "generate.temperature=0.8",
        "generate.top_k=20",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:") + 10


def test_finetune_from_checkpoint(pretrained, tmp_path):
    proc = run_cli(
        "finetune",
        f"init_from={pretrained}",
        "data=wikitext2",
        f"data.path={SHARED / 'wikitext2' / 'valid.txt'}",
        *TINY,
        "trainer.max_steps=20",
        "trainer.eval_every=10",
        "optim.lr=1e-3",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "initialised from" in proc.stdout
    meta = json.loads((tmp_path / "checkpoints" / "step_0000020" / "meta.json").read_text())
    assert meta["init_from"].endswith("step_0000060") and meta["stage"] == "finetune"
    val = [r for r in _metrics(tmp_path) if "val/loss" in r]
    assert val[-1]["val/loss"] < val[0]["val/loss"] + 0.05  # training on the new data does not diverge


# ----------------------------------------------------------------------------- bad input
def test_missing_data_file(tmp_path):
    assert_user_error(
        run_cli("pretrain", "data=text", f"data.path={tmp_path / 'nope.txt'}", f"hydra.run.dir={tmp_path / 'r'}"),
        "nope.txt",
    )


def test_empty_and_whitespace_corpus(tmp_path):
    for name, content in (("empty.txt", ""), ("blank.txt", "  \n\t \n")):
        f = tmp_path / name
        f.write_text(content)
        assert_user_error(run_cli("pretrain", "data=text", f"data.path={f}", f"hydra.run.dir={tmp_path / 'r'}"), name)


def test_non_utf8_corpus_names_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"hello world " * 10 + b"caf\xe9")
    assert_user_error(
        run_cli("pretrain", "data=text", f"data.path={f}", f"hydra.run.dir={tmp_path / 'r'}"),
        "latin1.txt",
        "offset 123",
    )


def test_missing_checkpoint(tmp_path):
    assert_user_error(run_cli("evaluate", f"checkpoint={tmp_path / 'none'}", f"hydra.run.dir={tmp_path / 'r'}"), "none")


def test_corrupt_checkpoint_does_not_touch_earlier_output(pretrained, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"val/loss": 1.0}')
    proc = run_cli("evaluate", f"checkpoint={bad / 'model.safetensors'}", f"hydra.run.dir={out}")
    assert_user_error(proc, str(bad))
    # A checkpoint dir with valid metadata but garbage weights
    good = pretrained / "checkpoints" / "step_0000060"
    (bad / "meta.json").write_text((good / "meta.json").read_text())
    proc = run_cli("evaluate", f"checkpoint={bad}", f"hydra.run.dir={out}")
    assert_user_error(proc, "model.safetensors")
    assert (out / "eval.json").read_text() == '{"val/loss": 1.0}'


def test_bad_data_keeps_existing_run_outputs(pretrained, tmp_path):
    before = {p: p.read_bytes() for p in pretrained.rglob("*") if p.is_file()}
    # resume=auto: past the run-directory guard (a fresh run there is refused first), the data fails
    proc = run_cli(
        "pretrain",
        "data=text",
        f"data.path={tmp_path / 'missing.txt'}",
        "trainer.resume=auto",
        f"hydra.run.dir={pretrained}",
    )
    assert_user_error(proc, "missing.txt")
    after = {p: p.read_bytes() for p in pretrained.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert {p: b for p, b in before.items() if p.suffix != ".log"} == after


def test_finetune_needs_init_from(tmp_path):
    assert_user_error(run_cli("finetune", f"hydra.run.dir={tmp_path}"), "init_from")
