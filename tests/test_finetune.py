"""finetune tasks end to end (tiny checkpoints, few steps), LoRA, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, assert_user_error, run_cli
from llmtrain.config.schema import DataConfig, LoraConfig, ModelConfig, TaskConfig
from llmtrain.errors import UserError

FAST = ["trainer.progress=false", "trainer.log_every=2", "trainer.eval_batches=2", "data.batch_size=8"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _final(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bert")
    proc = run_cli(
        "pretrain",
        "model=bert_tiny",
        "objective=mlm",
        "data.seq_len=64",
        "data.batch_size=8",
        "trainer.max_steps=6",
        "trainer.eval_every=6",
        "trainer.eval_batches=1",
        "trainer.progress=false",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


# ----------------------------------------------------------------------------- LoRA (in process)
def _tiny(name="gpt2"):
    from llmtrain.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, n_layer=2, n_head=2, d_model=32, vocab_size=64, max_seq_len=32))


def test_lora_freezes_base_and_merge_matches_adapter_model():
    from llmtrain.models.lora import LoRALinear, apply_lora, merge_lora

    base = _tiny()
    model = _tiny()
    names = apply_lora(model, LoraConfig(r=4, alpha=8.0, targets=["attn"]))
    assert names == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():  # B = 0 at init: exactly the base model
        assert torch.equal(model(x), base(x))
    # one optimizer step moves only adapters
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    base_params = dict(base.named_parameters())
    for n, p in model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base_params[n.replace(".base.", ".")]), n
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()  # a clearly non-zero adapter
        adapted = model(x)
        # the merged weight is W + (alpha / r) B A, computed here independently of merge_lora
        expect = {
            f"{n}.weight": dict(model.named_modules())[n].base.weight
            + 2.0 * (dict(model.named_modules())[n].lora_B @ dict(model.named_modules())[n].lora_A)
            for n in names
        }
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        sd = model.state_dict()
        for k, w in expect.items():
            assert torch.allclose(sd[k], w)
        assert set(sd) == set(base.state_dict())  # loads wherever a base checkpoint does
        assert torch.allclose(model(x), adapted, atol=1e-5)
        assert not torch.allclose(adapted, base(x), atol=1e-3)


def test_lora_targets_matching_nothing_is_an_error():
    from llmtrain.models.lora import apply_lora

    with pytest.raises(UserError, match="finetune.lora.targets"):
        apply_lora(_tiny(), LoraConfig(r=2, targets=["nonexistent"]))


# ----------------------------------------------------------------------------- task data (in process)
def _task(name, tmp_path=None, model="gpt2", seq_len=48, **kw):
    from llmtrain.tasks import build_task
    from llmtrain.tokenizers.char import CharTokenizer

    tok = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
    mc = ModelConfig(name=model, n_layer=1, n_head=2, d_model=16, vocab_size=128, max_seq_len=128)
    return build_task(
        TaskConfig(name=name, **kw), tok, mc, DataConfig(seq_len=seq_len, batch_size=4, val_fraction=0.25)
    ), tok


def test_instruction_loss_is_on_assistant_tokens_only(tmp_path):
    records = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Q{i}?"},
                {"role": "assistant", "content": f"A{i}."},
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": "No."},
            ]
        }
        for i in range(8)
    ]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    task, tok = _task("instruction", train_path=str(f), seq_len=128)
    for e in task.train_examples():
        targets = [t for t in e["labels"] if t != -100]
        i = e["where"].split("record ")[1]
        # independent reference: each assistant reply's characters followed by eos
        assert targets == tok.encode(f"A{int(i) - 1}.") + [tok.eos_id] + tok.encode("No.") + [tok.eos_id]
        assert tok.decode(e["prompt"]).endswith("More?\n\n### Assistant:\n")
        assert e["refs"] == ["No."]
    assert len(task.train_examples()) == 6 and len(task.val_examples()) == 2


def test_packing_keeps_every_response_token(tmp_path):
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps([{"instruction": f"Say {i}", "input": "", "output": f"{i}!"} for i in range(40)]))
    plain, _ = _task("instruction", train_path=str(f), seq_len=128)
    packed, _ = _task("instruction", train_path=str(f), seq_len=128, packing=True)
    rows = packed.train_examples()
    assert len(rows) < len(plain.train_examples()) and all(len(r["ids"]) <= 128 for r in rows)
    count = lambda ex: sum(t != -100 for e in ex for t in e["labels"])  # noqa: E731
    assert count(rows) == count(plain.train_examples())


def test_long_examples_are_truncated_and_reported(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"{'x' * (10 + 20 * (i % 3))}\t{i % 2}\n" for i in range(12)))
    task, _ = _task("classification", train_path=str(f), text_field="sentence", seq_len=32)
    ex = task.train_examples() + task.val_examples()
    assert len(ex) == 12 and max(len(e["ids"]) for e in ex) == 32
    too_long = sum(10 + 20 * (i % 3) > 32 - 2 for i in range(12))  # room: 32 - [CLS] - [SEP]
    assert task.report["truncated"] == too_long == 4
    assert f"truncated {too_long}" in task.summary()


def test_qa_features_point_at_the_answer():
    task, tok = _task(
        "extractive_qa",
        model="bert",
        seq_len=64,
        train_path=str(SHARED / "squad_v2_subset" / "dev.json"),
        max_examples=30,
        doc_stride=16,
    )
    hits = 0
    for f in task.train_examples():
        if f["start"]:
            hits += 1
            q = f["qid"]
            text = tok.decode(f["ids"][f["start"] : f["end"] + 1])
            # the labelled span decodes to one of the gold answers of that question (char tokenizer)
            golds = {a["text"] for a in _squad_answers()[q]}
            assert text in golds, (text, golds)
    assert hits > 0


def _squad_answers():
    data = json.loads((SHARED / "squad_v2_subset" / "dev.json").read_text())["data"]
    return {q["id"]: q["answers"] for a in data for p in a["paragraphs"] for q in p["qas"]}


@pytest.mark.parametrize(
    "content, bad",
    [
        ('[{"instruction": "Hi", "input": "", "output": ""}]', "empty response"),
        ('[{"instruction": " ", "input": "", "output": "x"}]', "empty prompt"),
    ],
)
def test_empty_prompt_or_response_names_the_record(tmp_path, content, bad):
    f = tmp_path / "a.json"
    f.write_text(content)
    task, _ = _task("instruction", train_path=str(f), val_path=str(f))
    with pytest.raises(UserError, match=f"a.json: record 1: {bad}"):
        task.train_examples()


@pytest.mark.parametrize(
    "name, content, where",
    [
        (
            "a.json",
            r'[{"instruction": "Hi", "output": "ok"}, {"instruction": "x \ud83d y", "output": "z"}]',
            "record 2 field 'instruction'",
        ),
        (
            "c.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}]}\n'
            r'{"messages": [{"role": "user", "content": "\udfff"}]}',
            "record 2 field 'messages[0].content'",
        ),
    ],
)
def test_unpaired_surrogate_names_the_record(tmp_path, name, content, where):
    """A JSON escape that spells half a surrogate pair is not text: named, not a crash later."""
    f = tmp_path / name
    f.write_text(content)
    task, _ = _task("instruction", train_path=str(f), val_path=str(f))
    with pytest.raises(UserError, match=re.escape(f"{name}: {where} holds an unpaired surrogate")):
        task.train_examples()


def test_task_and_architecture_must_fit():
    with pytest.raises(UserError, match="task=extractive_qa needs an encoder checkpoint"):
        _task("extractive_qa", model="gpt2")
    with pytest.raises(UserError, match="task=summarization needs a decoder checkpoint"):
        _task("summarization", model="bert")


def test_label_outside_declared_set(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("text,label\ngood,pos\nbad,neg\nmeh,neutral\n")
    task, _ = _task("classification", train_path=str(f), val_path=str(f), labels=["neg", "pos"])
    with pytest.raises(UserError, match=r"t.csv: record 3 has label 'neutral' outside the label set"):
        task.train_examples()


# ----------------------------------------------------------------------------- end to end (CLI)
def test_classification_lora_end_to_end(pretrained, tmp_path):
    run = tmp_path / "sst2"
    args = [
        "finetune",
        "+experiment=finetune_sst2",
        f"init_from={pretrained}",
        *FAST,
        f"task.train_path={SHARED / 'sst2' / 'train.tsv'}",
        f"task.val_path={SHARED / 'sst2' / 'dev.tsv'}",
        "data.seq_len=48",
        "task.max_examples=64",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
        "finetune.lora.r=4",
        "optim.lr=1e-2",
        f"hydra.run.dir={run}",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "new heads (randomly initialised): head.weight [2, 64], head.bias [2]" in proc.stdout
    assert "LoRA r=4" in proc.stdout and "trainable of" in proc.stdout
    rows = _metrics(run)
    assert rows[0]["step"] == 0 and "val/loss" in rows[0]  # before training
    at_end = [k for r in rows if r["step"] == 4 for k in r if k != "step"]
    assert len(at_end) == len(set(at_end)), at_end  # one value per name at a step
    final = {k: v for r in rows if r["step"] == 4 for k, v in r.items()}
    assert {"val/accuracy", "val/macro_f1", "val/examples", "val/loss"} <= set(final)
    assert not any(k.endswith("/ppl") for r in rows for k in r)  # a classifier's loss is no perplexity

    ck = _final(run)
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["task"]["state"]["labels"] == ["0", "1"] and meta["lora"]["merged"] is True
    adapter = load_file(str(ck / "adapter.safetensors"))
    assert {k for k in adapter if "lora" not in k} == {"head.weight", "head.bias"}
    # frozen base: everything outside the attention layers equals the pretrained weights
    base = load_file(str(_final(pretrained) / "model.safetensors"))
    tuned = load_file(str(ck / "model.safetensors"))
    for k, w in base.items():
        if ".attn." in k and k.endswith("weight"):
            assert not torch.equal(tuned[f"backbone.{k}"], w), k  # merged adapters changed it
        else:
            assert torch.equal(tuned[f"backbone.{k}"], w), k

    # metrics recomputed independently from the saved model, one example at a time
    from llmtrain.checkpoints import load

    loaded = load(str(run))
    model, task = loaded.model, loaded.task
    ex = task.val_examples()
    with torch.no_grad():
        preds = [int(model(**{k: v for k, v in task.collate([e]).items() if k != "labels"}).argmax(-1)) for e in ex]
    gold = [e["label"] for e in ex]
    # val/accuracy: the trainer's validation pass (trainer.eval_batches=2 batches of 8); the task's
    # own metrics at the end cover every validation example
    assert final["val/accuracy"] == pytest.approx(sum(p == g for p, g in zip(preds[:16], gold[:16])) / 16)
    assert final["val/examples"] == len(gold)
    f1s = []
    for c in (0, 1):
        tp = sum(p == g == c for p, g in zip(preds, gold))
        prec, rec = tp / max(preds.count(c), 1), tp / max(gold.count(c), 1)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    assert final["val/macro_f1"] == pytest.approx(sum(f1s) / 2)

    # resuming the finished run: the checkpoint resume would take is the merged final one, even
    # behind a newer corrupt one (which resume skips, so it must not be what is checked)
    corrupt = run / "checkpoints" / "step_9999999"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"x")
    again = run_cli(*args, "trainer.resume=auto")
    assert_user_error(again, "merged final checkpoint", "nothing to resume")


def test_bert_qa_and_pair_classification(bert_ckpt, tmp_path):
    run = tmp_path / "qa"
    proc = run_cli(
        "finetune",
        "+experiment=qa_squad",
        f"init_from={bert_ckpt}",
        *FAST,
        f"task.train_path={SHARED / 'squad_v2_subset' / 'dev.json'}",
        "data.seq_len=64",
        "task.max_examples=8",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = _metrics(run)[-1]
    assert {"val/exact", "val/f1", "val/HasAns_f1", "val/NoAns_exact"} <= set(final)
    assert "val/span_accuracy" in _metrics(run)[-2]

    pairs = tmp_path / "nli.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"premise": "a b" * (i % 5 + 1), "hypothesis": "c", "gold": ["yes", "no", "maybe"][i % 3]})
            + "\n"
            for i in range(30)
        )
    )
    run2 = tmp_path / "nli"
    proc = run_cli(
        "finetune",
        "task=classification",
        f"init_from={run}",
        *FAST,
        "data.seq_len=32",
        f"task.train_path={pairs}",
        "task.text_field=premise",
        "task.text_pair_field=hypothesis",
        "task.label_field=gold",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        f"hydra.run.dir={run2}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "head.weight [3, 64]" in proc.stdout  # init from the QA fine-tune: a new head for the new task
    assert json.loads((_final(run2) / "meta.json").read_text())["task"]["state"]["labels"] == ["maybe", "no", "yes"]


def test_sft_and_summarization_end_to_end(pretrained, tmp_path):
    run = tmp_path / "sft"
    proc = run_cli(
        "finetune",
        "+experiment=sft_dolly",
        f"init_from={pretrained}",
        *FAST,
        f"task.train_path={SHARED / 'dolly_chat' / 'train.jsonl'}",
        "data.seq_len=64",
        "task.max_examples=24",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        "eval.max_examples=2",
        "task.max_new_tokens=8",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"val/rougeL", "val/bleu"} <= set(_metrics(run)[-1]) and "generated:" in proc.stdout
    # a plain decoder checkpoint (no head): loadable by every stage, e.g. generate
    gen = run_cli(
        "generate",
        f"checkpoint={run}",
        "generate.prompt=### User:",
        "generate.max_new_tokens=5",
        f"hydra.run.dir={tmp_path / 'g'}",
    )
    assert gen.returncode == 0, gen.stderr[-2000:]

    run2 = tmp_path / "sum"
    proc = run_cli(
        "finetune",
        "+experiment=summarize_scitldr",
        f"init_from={pretrained}",
        *FAST,
        f"task.train_path={SHARED / 'scitldr' / 'train.jsonl'}",
        f"task.val_path={SHARED / 'scitldr' / 'dev.jsonl'}",
        "data.seq_len=64",
        "task.max_examples=16",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "eval.max_examples=2",
        "task.max_new_tokens=8",
        f"hydra.run.dir={run2}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "truncated" in proc.stdout and {"val/rouge1", "val/rouge2"} <= set(_metrics(run2)[-1])


def test_bad_inputs_exit_2(pretrained, tmp_path):
    f = tmp_path / "no_label.tsv"
    f.write_text("sentence\tpolarity\nfine\t1\nbad\t0\n")
    assert_user_error(
        run_cli(
            "finetune",
            "task=classification",
            f"init_from={pretrained}",
            f"task.train_path={f}",
            "task.text_field=sentence",
            f"hydra.run.dir={tmp_path / 'a'}",
        ),
        "no_label.tsv: record 1 has no field 'label'",
    )
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "robot", "content": "beep"}]})
        + "\n"
    )
    assert_user_error(
        run_cli(
            "finetune",
            "task=instruction",
            f"init_from={pretrained}",
            f"task.train_path={chat}",
            f"task.val_path={chat}",
            "data.seq_len=32",
            f"hydra.run.dir={tmp_path / 'b'}",
        ),
        "chat.jsonl: record 2",
        "unknown role 'robot'",
    )
    assert_user_error(
        run_cli(
            "finetune",
            "+experiment=sft_alpaca",
            f"init_from={pretrained}",
            "tokenizer=byte",
            f"task.train_path={SHARED / 'alpaca_demo' / 'train.json'}",
            "data.seq_len=32",
            f"hydra.run.dir={tmp_path / 'd'}",
        ),
        "checkpoint's tokenizer",
    )


def test_headerless_files_read_with_task_columns(tmp_path):
    spam = tmp_path / "spam.tsv"  # no header row: the first record would become one
    spam.write_text("ham\tGo until jurong point, crazy\nspam\tFree entry in 2 a wkly comp\nham\tOk lar\n")
    task, _ = _task("classification", train_path=str(spam), val_path=str(spam))
    with pytest.raises(
        UserError, match=r"no column 'label'; the header row \('ham', 'Go until .*looks like data.*task\.columns"
    ):
        task.train_examples()
    task, _ = _task("classification", train_path=str(spam), val_path=str(spam), columns=["label", "text"])
    assert task.labels == ["ham", "spam"] and len(task.train_examples()) == 3  # the first row is data

    # STS-B: ten columns, no header; a sentence pair labelled by its genre
    stsb = tmp_path / "stsb.tsv"
    rows = (SHARED / "stsb" / "dev.tsv").read_text().splitlines()
    stsb.write_text("\n".join(rows[:10] + rows[-10:]) + "\n")
    cols = ["idx", "genre", "file", "year", "old_idx", "src1", "src2", "sentence1", "sentence2", "score"]
    task, tok = _task(
        "classification",
        train_path=str(stsb),
        val_path=str(stsb),
        columns=cols,
        text_field="sentence1",
        text_pair_field="sentence2",
        label_field="genre",
    )
    first = task.train_examples()[0]
    assert len(task.train_examples()) == 20 and tok.sep_id in first["ids"]  # a pair: two segments
    assert task.labels == ["main-captions", "main-news"]
    with pytest.raises(UserError, match=r"stsb.tsv: row 1 has 10 columns but task.columns names 2"):
        _task("classification", train_path=str(stsb), val_path=str(stsb), columns=["a", "b"])[0].train_examples()

    # a real header stays the usual *_field hint
    ok = tmp_path / "ok.csv"
    ok.write_text("sentence,label\ngood,1\nbad,0\n")
    task, _ = _task("classification", train_path=str(ok), val_path=str(ok))
    with pytest.raises(UserError, match=r"has no field 'text' \(fields: sentence, label\); set the task's \*_field"):
        task.train_examples()
