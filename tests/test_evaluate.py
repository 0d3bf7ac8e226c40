"""`llmtrain evaluate`: each metric against an independent reference on fixed examples, the same
numbers from 2 processes as from 1, the reports, and `llmtrain plot`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, SHARED, assert_user_error, run_cli, sst2_split
from llmtrain.checkpoints import load as load_checkpoint
from llmtrain.eval.report import markdown_report
from llmtrain.eval.suite import classification_result, report_task_output
from llmtrain.generation import sample_text

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 12


def _eval(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.json").read_text())


def _greedy(model, tok, prompt: str, n: int) -> str:
    return sample_text(model, tok, prompt, max_new_tokens=n, temperature=0.0).strip()


@pytest.fixture(scope="module")
def inputs(pretrained, tmp_path_factory) -> dict:
    """A text file, and prompt/response records whose example 3 has the model's own greedy output
    as its reference, so exact match is exactly 1/5 (unless evaluate generates something else)."""
    root = tmp_path_factory.mktemp("eval_inputs")
    text = root / "t.txt"
    text.write_text(TEXT)
    loaded = load_checkpoint(str(pretrained))
    prompts = ["ROMEO:", "Speak, speak.\n", "First Citizen:\nYou are", "All", "What say you to this?"]
    refs = [
        ["ROMEO: I will go."],
        ["All: we know it."],
        [_greedy(loaded.model, loaded.tokenizer, prompts[2], 8)],
        ["All:\nAgainst him first.", "All: no more talking on it"],
        ["Let it be done."],
    ]
    path = root / "refs.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "response": r if len(r) > 1 else r[0]}) + "\n" for p, r in zip(prompts, refs))
    )
    return {"text": text, "refs_file": path, "prompts": prompts, "refs": refs, "loaded": loaded}


EVAL_ARGS = [
    "eval.tasks=[lm,generation]",
    "data=text",
    "data.seq_len=16",
    "data.batch_size=2",
    "eval.max_new_tokens=8",
    "eval.batch_size=2",
]


@pytest.fixture(scope="module")
def one_process(pretrained, inputs, tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("eval_one")
    args = [
        "evaluate",
        f"checkpoint={pretrained}",
        *EVAL_ARGS,
        f"data.path={inputs['text']}",
        f"task.val_path={inputs['refs_file']}",
    ]
    proc = run_cli(*args, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return out, args, proc


# ----------------------------------------------------------------------------- lm
def _reference_nll(model, ids: list[int], window: int = 16) -> tuple[float, int]:
    """Per-token NLL summed with torch over consecutive windows (the last one shorter)."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            y = torch.tensor(ids[s + 1 : s + window + 1])
            logits = model(torch.tensor([ids[s : s + len(y)]]))[0]
            nll += F.cross_entropy(logits.double(), y, reduction="sum").item()
            n += len(y)
    return nll, n


def test_lm_scores_the_whole_file_given(inputs, one_process):
    """data.path given: every token of the file is scored (not its last 10%), as eval/*, and
    eval.json, run_info.json and config.yaml name the file with its size and sha256."""
    out, _, proc = one_process
    got = _eval(out)
    tok, model = inputs["loaded"].tokenizer, inputs["loaded"].model.eval()
    ids = tok.encode(TEXT) + [tok.eos_id]
    nll, n = _reference_nll(model, ids)
    n_bytes = len(tok.decode(ids[1:]).encode("utf-8"))
    assert n == len(ids) - 1 and not [k for k in got if k.startswith("val/")]
    assert got["eval/tokens"] == n
    assert got["eval/loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["eval/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["eval/bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert "eval/ppl" in proc.stdout and "generation/bleu" in proc.stdout
    md = (out / "eval.md").read_text()
    assert "| eval/loss |" in md and "## generation: samples" in md
    digest = hashlib.sha256(inputs["text"].read_bytes()).hexdigest()
    assert got["data"]["path"] == str(inputs["text"]) and got["data"]["split"] == "all"
    assert got["data"]["files"] == [{"path": str(inputs["text"].resolve()), "size": len(TEXT), "sha256": digest}]
    recorded = json.loads((out / "run_info.json").read_text())["data_files"]
    assert {"path": str(inputs["text"].resolve()), "size": len(TEXT), "sha256": digest} in recorded
    assert f"data.path={inputs['text']}" in (out / "overrides.yaml").read_text()
    assert str(inputs["text"]) in (out / "config.yaml").read_text()


def test_lm_val_split_and_val_path(pretrained, inputs, tmp_path):
    """eval.split=val scores the validation split, as val/*: data.val_path whole when it is set
    (eval.json names that file, not data.path)."""
    other = tmp_path / "other.txt"
    other.write_text(TEXT[: len(TEXT) // 3])
    proc = run_cli(
        "evaluate", f"checkpoint={pretrained}", "eval.tasks=[lm]", "eval.split=val", "data=text",
        f"data.path={inputs['text']}", f"data.val_path={other}", "data.seq_len=16", f"hydra.run.dir={tmp_path / 'ev'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _eval(tmp_path / "ev")
    tok, model = inputs["loaded"].tokenizer, inputs["loaded"].model.eval()
    nll, n = _reference_nll(model, tok.encode(other.read_text()) + [tok.eos_id])
    assert got["val/tokens"] == n and got["val/loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["data"]["path"] == str(other) and got["data"]["split"] == "val"
    assert [f["path"] for f in got["data"]["files"]] == [str(other.resolve())]


# ----------------------------------------------------------------------------- generation
def test_generation_metrics_match_sacrebleu_and_rouge(inputs, one_process):
    import sacrebleu
    from rouge_score import rouge_scorer

    got = _eval(one_process[0])
    prompts, refs, loaded = inputs["prompts"], inputs["refs"], inputs["loaded"]
    # batched, left-padded generation == each prompt generated alone
    hyps = [_greedy(loaded.model, loaded.tokenizer, p, 8) for p in prompts]
    assert [s["generated"] for s in got["details"]["generation"]["samples"]] == hyps
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(2)]
    assert got["generation/bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = sum(max(scorer.score(r, h)[key].fmeasure for r in rs) for h, rs in zip(hyps, refs)) / len(hyps)
        assert got[f"generation/{key}"] == pytest.approx(want, abs=1e-9)
    assert got["generation/exact_match"] == pytest.approx(1 / 5)
    assert got["generation/examples"] == 5 and got["generation/tokens_per_s"] > 0


def test_generation_reads_scitldr_lists(inputs):
    from llmtrain.config.schema import TaskConfig
    from llmtrain.eval.suite import prompt_ids, read_references

    path = SHARED / "scitldr" / "dev.jsonl"
    examples = read_references(str(path), TaskConfig(), max_examples=2)
    records = [json.loads(line) for line in path.read_text().splitlines()[:2]]
    assert len(examples) == 2
    for ex, rec in zip(examples, records):
        assert ex["references"] == rec["target"]  # every TLDR is a reference
        assert ex["prompt"] == " ".join(s.strip() for s in rec["source"])
    tok = inputs["loaded"].tokenizer
    assert prompt_ids(examples[0], tok, None, "{source} TL;DR:") == tok.encode(examples[0]["prompt"] + " TL;DR:")


# ----------------------------------------------------------------------------- 2 processes
def test_two_processes_give_the_one_process_numbers(inputs, one_process, tmp_path):
    """Shards without padding duplicates: the windows and 5 examples over 2 ranks give the same totals."""
    out, args, _ = one_process
    two = _torchrun(*args, f"hydra.run.dir={tmp_path}")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _eval(out), _eval(tmp_path)
    assert a["eval/tokens"] == b["eval/tokens"] and a["generation/examples"] == b["generation/examples"] == 5
    for k, v in a.items():
        if "/" in k and "tokens_per_s" not in k:
            assert b[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert a["details"]["generation"]["samples"] == b["details"]["generation"]["samples"]
    assert two.stdout.count("eval/loss") == 1  # only rank 0 reports


# ----------------------------------------------------------------------------- encoders
def test_mlm_accuracy_reproduces_the_trainer(tmp_path):
    run = tmp_path / "bert"
    proc = run_cli(
        "pretrain",
        "model=bert_tiny",
        "objective=mlm",
        "data.seq_len=32",
        "data.batch_size=8",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
        "trainer.eval_batches=3",
        "trainer.progress=false",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if "val/mlm_accuracy" in r][-1]
    proc = run_cli("evaluate", f"checkpoint={run}", "trainer.eval_batches=3", f"hydra.run.dir={tmp_path / 'ev'}")
    assert proc.returncode == 0, proc.stderr
    got = _eval(tmp_path / "ev")
    assert got["tasks"] == ["mlm"]  # the checkpoint's own objective by default
    assert got["mlm/accuracy"] == pytest.approx(final["val/mlm_accuracy"], abs=1e-6)
    assert got["mlm/loss"] == pytest.approx(final["val/loss"], rel=1e-5)


# ----------------------------------------------------------------------------- fine-tuned tasks
def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "llmtrain",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_classification_checkpoint_on_two_processes(pretrained, tmp_path):
    """A fine-tuned classifier scored by 2 ranks (40 examples in batches of 7: uneven shards) gives
    the metrics of its predictions made one example at a time, counted by hand."""
    train, dev = sst2_split(tmp_path)
    run = tmp_path / "cls"
    proc = run_cli(
        "finetune",
        f"init_from={pretrained}",
        "task=classification",
        f"task.train_path={train}",
        f"task.val_path={dev}",
        "task.text_field=sentence",
        "data.seq_len=48",
        "data.batch_size=8",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
        "trainer.progress=false",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = _torchrun("evaluate", f"checkpoint={run}", "eval.batch_size=7", f"hydra.run.dir={tmp_path / 'ev'}")
    assert two.returncode == 0, two.stderr[-3000:]
    got = _eval(tmp_path / "ev")
    assert got["tasks"] == ["classification"]

    loaded = load_checkpoint(str(run))
    model, task = loaded.model, loaded.task
    examples = task.val_examples()
    with torch.no_grad():
        preds = [
            int(model(**{k: v for k, v in task.collate([e]).items() if k != "labels"}).argmax(-1)) for e in examples
        ]
    gold = [e["label"] for e in examples]
    assert got["classification/examples"] == len(gold) == 40
    assert got["classification/accuracy"] == pytest.approx(sum(p == g for p, g in zip(preds, gold)) / 40)
    cm = [[sum(1 for p, g in zip(preds, gold) if g == i and p == j) for j in range(2)] for i in range(2)]
    assert got["details"]["classification"]["confusion_matrix"] == cm
    for i, name in enumerate(task.labels):
        if sum(cm[r][i] for r in range(2)):
            assert got[f"classification/precision[{name}]"] == pytest.approx(cm[i][i] / sum(cm[r][i] for r in range(2)))
        assert got[f"classification/recall[{name}]"] == pytest.approx(cm[i][i] / sum(cm[i]))
    assert "confusion matrix" in (tmp_path / "ev" / "eval.md").read_text()


# ----------------------------------------------------------------------------- task reports
def test_classification_report_matches_hand_computed():
    names = ["neg", "neu", "pos"]
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    preds = [0, 1, 2, 1, 0, 2, 2, 2, 0, 1]
    res = classification_result(preds, labels, names)
    m = res.metrics
    # by hand: neg tp=1 pred=3 true=3; neu tp=1 pred=3 true=2; pos tp=3 pred=4 true=5
    assert m["classification/accuracy"] == pytest.approx(5 / 10)
    assert m["classification/precision[neg]"] == pytest.approx(1 / 3)
    assert m["classification/recall[neu]"] == pytest.approx(1 / 2)
    assert m["classification/precision[pos]"] == pytest.approx(3 / 4)
    assert m["classification/recall[pos]"] == pytest.approx(3 / 5)

    def f1(p, r):
        return 2 * p * r / (p + r)

    assert m["classification/macro_f1"] == pytest.approx((f1(1 / 3, 1 / 3) + f1(1 / 3, 1 / 2) + f1(3 / 4, 3 / 5)) / 3)
    assert res.details["confusion_matrix"] == [[1, 1, 1], [1, 1, 0], [1, 1, 3]]
    md = markdown_report(
        {"checkpoint": "c", "tasks": ["classification"], **m, "details": {"classification": res.details}}
    )
    assert "| neg | 1 | 1 | 1 |" in md and "| pos | 0.7500 | 0.6000 |" in md


def test_console_table_prints_bracketed_class_names(capsys):
    from llmtrain.eval.report import print_table

    res = classification_result([0, 1, 1], [0, 1, 0], ["ham", "spam"])
    print_table(res.metrics)
    out = capsys.readouterr().out
    # rich would read "[ham]" as a markup tag and print two identical "classification/precision" rows
    assert "classification/precision[ham]" in out and "classification/recall[spam]" in out


def test_qa_report_of_official_squad_scores():
    from llmtrain.eval.metrics import squad_metrics

    refs = {"q1": ["The Eiffel Tower"], "q2": ["1889", "in 1889"], "q3": [""], "q4": ["Gustave Eiffel"]}
    preds = {"q1": "eiffel tower!", "q2": "built in 1889 by", "q3": "", "q4": "Alexandre Gustave"}
    res = report_task_output("qa", squad_metrics(preds, refs))
    # by hand, official normalisation (lowercase, no punctuation/articles): q1 exact; q2 F1 vs
    # "in 1889" = 2*(2/4)*(2/2)/(2/4+2/2) = 2/3; q3 no-answer exact; q4 F1 = 2*(1/2)*(1/2)/1 = 1/2
    assert res.metrics["qa/exact"] == pytest.approx(100 * 2 / 4)
    assert res.metrics["qa/f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 1 / 2) / 4)
    assert res.metrics["qa/HasAns_total"] == 3 and res.metrics["qa/NoAns_exact"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- bad input
def test_bad_eval_input(pretrained, tmp_path):
    assert_user_error(
        run_cli("evaluate", f"checkpoint={pretrained}", "eval.tasks=[lm,bogus]", f"hydra.run.dir={tmp_path / 'a'}"),
        "eval.tasks",
        "bogus",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    assert_user_error(
        run_cli(
            "evaluate",
            f"checkpoint={pretrained}",
            "eval.tasks=[generation]",
            f"task.val_path={bad}",
            f"hydra.run.dir={tmp_path / 'c'}",
        ),
        "bad.jsonl",
        "record 2",
    )
    assert not (tmp_path / "c" / "eval.json").exists()


# ----------------------------------------------------------------------------- plots
def test_pretrain_writes_curves_and_plot_overlays_a_sweep(pretrained, tmp_path):
    assert (pretrained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = tmp_path / "sweep"
    for i, lr in enumerate(("1e-3", "3e-4")):
        job = sweep / str(i)
        job.mkdir(parents=True)
        (job / "metrics.jsonl").write_text((pretrained / "metrics.jsonl").read_text())
        (job / "overrides.yaml").write_text(f"- model=gpt_tiny\n- optim.lr={lr}\n")
    proc = run_cli("plot", str(sweep), "-o", str(tmp_path / "sweep.png"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    from llmtrain.eval.plot import run_label, short_labels

    labels, title = short_labels([run_label(sweep / "0"), run_label(sweep / "1")], [sweep / "0", sweep / "1"])
    assert labels == ["optim.lr=1e-3", "optim.lr=3e-4"] and title == "model=gpt_tiny"
    assert_user_error(run_cli("plot", str(tmp_path / "nothing")), "nothing")
