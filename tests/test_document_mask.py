"""data.document_mask=true (issue 20, item 4): packed documents are attended, positioned and
predicted as if each were run alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED, TINY, run_cli
from llmtrain.config import check_document_model, register_configs
from llmtrain.config.compose import compose_run, hydra_session, validate
from llmtrain.config.schema import DataConfig, ModelConfig, ObjectiveConfig, TaskConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.data.documents import mark_documents
from llmtrain.errors import UserError
from llmtrain.models import Bert, build_model
from llmtrain.models.layers import document_positions
from llmtrain.objectives import build_objective
from llmtrain.objectives.base import token_cross_entropy
from llmtrain.tasks import build_task
from llmtrain.tokenizers.char import CharTokenizer

register_configs()
EOS = 3  # the char tokenizer's eos id, as in a prepared token stream


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, n_layer=2, n_head=4, d_model=32, vocab_size=40, max_seq_len=64)
    if name == "llama":
        cfg = ModelConfig(**{**cfg.__dict__, "n_kv_heads": 2, "bias": False})
    return build_model(cfg).eval()


def _stream(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Documents of these lengths, each ending with eos as in the packed stream."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 40, (n - 1,), generator=g).tolist() + [EOS] for n in lengths]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_document_mask_equals_separate_forward_passes(name):
    model = _model(name)
    rows = [_stream([7, 12, 5, 9]), _stream([20, 13], seed=1)]  # different boundaries per row
    window = torch.tensor([sum(docs, []) for docs in rows])  # [2, 33]: 32 inputs + the last target
    batch = mark_documents({"input_ids": window[:, :-1], "labels": window[:, 1:]}, EOS)
    with torch.no_grad():
        packed = model(batch["input_ids"], document_ids=batch["document_ids"])
        plain = model(batch["input_ids"])
        for r, docs in enumerate(rows):
            start, crossed = 0, 0.0
            for doc in docs:
                n = min(len(doc), window.shape[1] - 1 - start)
                alone = model(torch.tensor([doc[:n]]))[0]
                torch.testing.assert_close(packed[r, start : start + n], alone, rtol=1e-5, atol=1e-5)
                if start:  # without the mask a later document sees the earlier ones
                    crossed = max(crossed, (plain[r, start : start + n] - alone).abs().max().item())
                start += n
            assert crossed > 1e-3


def test_boundary_target_is_ignored_and_positions_restart():
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 10], [EOS, 11, 12, 13, 14, 15, 16, 17]])
    labels = torch.arange(100, 116).view(2, 8)
    b = mark_documents({"input_ids": ids, "labels": labels}, EOS)
    assert b["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(b["document_ids"]).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    ignored = b["labels"] == -100
    assert ignored.tolist() == (ids == EOS).tolist()  # exactly the targets after an eos
    assert torch.equal(b["labels"][~ignored], labels[~ignored])


def test_clm_batches_carry_documents_as_a_function_of_the_step():
    tok = CharTokenizer("abcdefghij")
    stream = np.array(sum(_stream([9, 30, 4, 17, 11, 25, 8, 40, 6, 22]), []), dtype=np.uint16)
    splits = TokenSplits(train=stream, val=stream[:50], n_docs=10, val_bytes=50)

    def objective(mask: bool):
        data = DataConfig(seq_len=16, batch_size=4, document_mask=mask)
        return build_objective(ObjectiveConfig(name="clm"), tok, splits, data, seed=3)

    masked, plain = objective(True), objective(False)
    for step in (0, 5):
        a, b = masked.train_source().batch(step), plain.train_source().batch(step)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"].masked_fill(b["input_ids"] == EOS, -100))
        assert torch.equal(a["document_ids"], masked.train_source().batch(step)["document_ids"])
    val, plain_val = next(iter(masked.val_batches())), next(iter(plain.val_batches()))
    assert "document_ids" in val and "document_ids" not in plain_val
    assert torch.equal(val["labels"], plain_val["labels"].masked_fill(plain_val["input_ids"] == EOS, -100))
    model = _model("llama")
    with torch.no_grad():  # the objective's loss goes through the mask: it differs from the plain one
        assert masked.loss(model, val).loss.item() != pytest.approx(plain.loss(model, plain_val).loss.item(), abs=1e-4)


def test_sft_packing_with_the_mask_equals_the_examples_alone(tmp_path):
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps([{"instruction": f"Say {i} twice", "input": "", "output": f"{i} {i}!"} for i in range(24)]))
    tok = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
    mc = ModelConfig(name="gpt2", n_layer=2, n_head=2, d_model=32, vocab_size=128, max_seq_len=128)

    def task(packing: bool):
        data = DataConfig(seq_len=128, batch_size=4, val_fraction=0.25, document_mask=packing)
        return build_task(TaskConfig(name="instruction", train_path=str(f), packing=packing), tok, mc, data)

    examples, rows = task(False).train_examples(), task(True).train_examples()[:3]
    batch = task(True).collate(rows)
    for i, r in enumerate(rows):  # each example its own document, the padding one more
        assert batch["document_ids"][i, : len(r["ids"])].tolist() == r["docs"]
        assert bool((batch["document_ids"][i, len(r["ids"]) :] == -1).all())
    n_examples = sum(r["docs"][-1] + 1 for r in rows)
    assert n_examples > len(rows)
    torch.manual_seed(0)
    model = build_model(mc).eval()
    with torch.no_grad():
        got = task(True).loss(model, batch)
        alone = [token_cross_entropy(model(torch.tensor([e["ids"]])), torch.tensor([e["labels"]])) for e in examples]
        total = sum(float(loss) * int(n) for loss, n in alone[:n_examples])
        count = sum(int(n) for _, n in alone[:n_examples])
        assert int(got.n_targets) == count
        assert got.loss.item() == pytest.approx(total / count, rel=1e-5)
        leaky = token_cross_entropy(model(batch["input_ids"]), batch["labels"])[0].item()
        assert leaky != pytest.approx(total / count, rel=1e-4)  # packing without the mask sees earlier examples


def _refused(stage: str, *overrides: str) -> str:
    with hydra_session(stage), pytest.raises(UserError) as e:
        validate(compose_run(stage, list(overrides)))
    return str(e.value)


def test_other_objectives_tasks_and_models_are_refused():
    assert "objective=mlm" in _refused("pretrain", "model=bert_tiny", "objective=mlm", "data.document_mask=true")
    msg = _refused("finetune", "init_from=x", "task=instruction", "task.train_path=x.json", "data.document_mask=true")
    assert "task.packing=False" in msg
    assert "task=classification" in _refused(
        "finetune", "init_from=x", "task=classification", "task.train_path=x.tsv", "data.document_mask=true"
    )
    with hydra_session("pretrain"):  # what fits is accepted
        assert validate(compose_run("pretrain", ["model=llama_tiny", "data.document_mask=true"])).data.document_mask
    with pytest.raises(UserError, match="needs a gpt2 or llama decoder"):
        check_document_model(Bert, "init_from=RUN (bert)")


def test_pretrain_with_the_mask_runs(tmp_path):
    text = (SHARED / "wikitext2" / "valid.txt").read_text()
    (tmp_path / "wiki.txt").write_text(text[: text.index("\n", 60_000) + 1])  # a few articles: a fast run
    run = tmp_path / "run"
    proc = run_cli(
        "pretrain",
        *TINY,
        "data=wikitext2",
        f"data.path={tmp_path / 'wiki.txt'}",
        "data.document_mask=true",
        "trainer.max_steps=6",
        "trainer.eval_every=6",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert val and all(np.isfinite(val))
    assert list((run / "checkpoints").glob("step_*/model.safetensors"))


def test_sft_packing_with_the_mask_runs(tmp_path, pretrained):
    records = json.loads((SHARED / "alpaca_demo" / "train.json").read_text())[:60]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    run = tmp_path / "sft"
    proc = run_cli(
        "finetune",
        "+experiment=sft_alpaca",  # task=instruction, task.packing=true
        f"init_from={pretrained}",
        f"task.train_path={tmp_path / 'alpaca.json'}",
        "data.document_mask=true",
        "data.seq_len=64",
        "data.batch_size=4",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
        "trainer.eval_batches=2",
        "trainer.progress=false",
        "eval.max_examples=2",
        "task.max_new_tokens=4",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/loss"] for r in rows if r["step"] == 4 and "val/loss" in r]
