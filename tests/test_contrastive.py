"""Contrastive sentence embeddings: the InfoNCE loss, the STS metrics, pair files, exact resume of
objective=contrastive, and `llmtrain embed` / `evaluate eval.tasks=[sts]` through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from conftest import assert_user_error, run_cli
from llmtrain.config.schema import DataConfig, ModelConfig, ObjectiveConfig, RunConfig, TrainerConfig
from llmtrain.data.sentences import read_pairs, read_sentences
from llmtrain.errors import UserError
from llmtrain.eval.sts import alignment, sts_metrics, uniformity
from llmtrain.objectives import build_objective
from llmtrain.objectives.contrastive import info_nce, pool

SENTENCES = [
    "A man is playing the cello.",
    "A woman is slicing an onion.",
    "Two dogs run across the field.",
    "The cat sleeps on the sofa.",
    "A child rides a red bicycle.",
    "Someone is cooking pasta.",
    "The train leaves at noon.",
    "Birds sing in the morning.",
    "A boy kicks a football.",
    "The river flows to the sea.",
    "She reads a long novel.",
    "He paints the old fence.",
]


def test_info_nce_equals_reference_on_fixed_embeddings():
    g = torch.Generator().manual_seed(0)
    anchors, candidates = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)  # 2 hard negatives
    t = 0.05
    loss, correct = info_nce(anchors, candidates, t)
    a, c = anchors.double().numpy(), candidates.double().numpy()
    terms, hits = [], 0
    for i in range(len(a)):  # -log softmax of the positive among every candidate, by hand
        sims = [a[i] @ c[j] / (np.linalg.norm(a[i]) * np.linalg.norm(c[j])) / t for j in range(len(c))]
        m = max(sims)
        terms.append(-(sims[i] - m - math.log(sum(math.exp(s - m) for s in sims))))
        hits += int(np.argmax(sims) == i)
    assert loss.item() == pytest.approx(float(np.mean(terms)), rel=1e-5)
    assert int(correct) == hits


def test_mean_and_cls_pooling_leave_padding_out():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def test_sts_spearman_equals_scipy_on_a_fixed_case():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 2.0], [3.0, -1.0]])
    b = torch.tensor([[1.0, 0.1], [1.0, -1.0], [1.0, 1.0], [2.0, 1.0], [1.0, 0.0]])
    gold = [5.0, 0.5, 2.0, 3.5, 4.0]
    a64, b64 = a.double().numpy(), b.double().numpy()
    cos = [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a64, b64)]
    m = sts_metrics(a, b, gold, positive=4.0)
    assert m["sts/spearman"] == pytest.approx(spearmanr(cos, gold).statistic, abs=1e-12)
    assert m["sts/pearson"] == pytest.approx(pearsonr(cos, gold).statistic, abs=1e-12)
    assert m["sts/n"] == 5


def test_alignment_and_uniformity_on_fixed_vectors():
    # Alignment: mean squared distance of normalised positive pairs (Wang & Isola, alpha = 2).
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # pair 1: orthogonal (distance^2 = 2); pair 2: equal (0)
    assert alignment(a, b) == pytest.approx(1.0)
    # Uniformity: log of the mean of exp(-2 d^2) over the distinct pairs of 3 unit vectors.
    x = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    d2 = [2.0, 4.0, 2.0]  # (0,1), (0,2), (1,2)
    assert uniformity(x) == pytest.approx(math.log(sum(math.exp(-2 * d) for d in d2) / 3))
    assert math.isnan(alignment(a[:0], b[:0]))


def test_read_pairs_headerless_columns_and_named_fields(tmp_path):
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("0\tg\tf\t2012\t1\tx\ty\tA cat.\tA dog.\t1.5\n1\tg\tf\t2012\t2\tx\ty\tHi there.\tHello.\t4.25\n")
    pairs = read_pairs(str(tsv), ["8", "9", "10"], "eval.sts_path")
    got = [(p.a, p.b, p.score, p.line) for p in pairs]
    assert got == [("A cat.", "A dog.", 1.5, 1), ("Hi there.", "Hello.", 4.25, 2)]
    jl = tmp_path / "pairs.jsonl"
    jl.write_text('{"s1": "a", "s2": "b"}\n\n{"s1": "c", "s2": "d"}\n')
    assert [(p.a, p.b, p.score) for p in read_pairs(str(jl), ["s1", "s2"], "data.path")] == [
        ("a", "b", 1.0),
        ("c", "d", 1.0),
    ]


@pytest.mark.parametrize(
    "content, columns, needle",
    [
        ("a\tb\n", ["8", "9", "10"], "line 1 has 2 columns, needs column 10"),
        ("0\t1\t2\t3\t4\t5\t6\tA\tB\tfive\n", ["8", "9", "10"], "line 1: score column 10 is 'five', not a number"),
        ("", ["8", "9", "10"], "no sentence pairs"),
        ("x\ty\n", ["x", "y", "score"], "no column 'score' in the header row"),
        ("a\tb\n", ["1"], "expected 2 or 3 columns"),
    ],
)
def test_bad_pair_files_are_one_user_error(tmp_path, content, columns, needle):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")) as e:
        read_pairs(str(path), columns, "data.path")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="file not found"):
        read_pairs(str(tmp_path / "missing.tsv"), ["8", "9", "10"], "eval.sts_path")


def test_read_sentences_keeps_lines_for_embed(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("one\n\n two \nthree\n")
    assert read_sentences(str(p), keep_empty=True) == ["one", "", "two", "three"]
    assert read_sentences(str(p)) == ["one", "two", "three"]


def _objective(tmp_path, **objective):
    from llmtrain.tokenizers.char import CharTokenizer

    path = tmp_path / "pairs.tsv"
    scores = [5, 1, 4.5, 0, 4, 2]
    path.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in zip(SENTENCES[::2], SENTENCES[1::2], scores)))
    tok = CharTokenizer.train(SENTENCES)
    data = DataConfig(path=str(path), seq_len=32, batch_size=5, val_fraction=0.0)
    return build_objective(ObjectiveConfig(name="contrastive", **objective), tok, None, data, seed=3), tok


def test_supervised_batches_positives_and_hard_negatives(tmp_path):
    obj, tok = _objective(tmp_path, pair_columns=["1", "2", "3"], positive_threshold=4.0, hard_negative_threshold=1.0)
    batch = obj.train_source().batch(0)  # 5 pairs: the one scoring 2 is neither positive nor negative
    assert batch["labels"].tolist() == list(range(5))
    rows = [tok.decode(r.tolist()) for r in batch["input_ids"]]
    anchors, targets, negatives = rows[:5], rows[5:10], rows[10:]
    pairs = dict(zip(SENTENCES[::2], zip(SENTENCES[1::2], [5, 1, 4.5, 0, 4, 2])))
    assert sorted(anchors) == sorted(a for a, (_, s) in pairs.items() if s != 2)
    for a, t in zip(anchors, targets):  # a positive pair's target is B, otherwise A's second view
        b, score = pairs[a]
        assert t == (b if score >= 4 else a)
    assert sorted(negatives) == sorted(b for b, s in pairs.values() if s <= 1)
    assert torch.equal(obj.train_source().batch(5)["input_ids"], obj.train_source().batch(5)["input_ids"])


def _train(run_dir: Path, sentences: Path, max_steps: int, resume: str) -> dict[int, float]:
    """In process: a tiny unsupervised contrastive run through the one Trainer."""
    from llmtrain.checkpoints import checkpoint_meta
    from llmtrain.models import build_model, resolve_model_config
    from llmtrain.runtime import setup_runtime
    from llmtrain.tokenizers.char import CharTokenizer
    from llmtrain.train.freeze import freeze_unused
    from llmtrain.train.tracking import MetricsLogger
    from llmtrain.train.trainer import Trainer

    cfg = RunConfig()
    cfg.model = ModelConfig(name="bert", n_layer=1, n_head=2, d_model=32, max_seq_len=32, dropout=0.1, norm_eps=1e-12)
    cfg.objective = ObjectiveConfig(name="contrastive", temperature=0.1)
    cfg.data = DataConfig(path=str(sentences), seq_len=32, batch_size=4, val_fraction=0.2)
    cfg.trainer = TrainerConfig(
        max_steps=max_steps, eval_every=0, log_every=1, resume=resume, progress=False, ckpt_every_minutes=0
    )
    cfg.scheduler.name, cfg.scheduler.warmup_steps = "constant", 0
    rt = setup_runtime(cfg, run_dir)
    tok = CharTokenizer.train(SENTENCES)
    model_cfg = resolve_model_config(cfg.model, tok)
    model = build_model(model_cfg)
    objective = build_objective(cfg.objective, tok, None, cfg.data, cfg.trainer.seed)
    objective.prepare_model(model, model_cfg)  # as the pretrain stage does
    assert "pooler.weight" in freeze_unused(model, objective)
    logger = MetricsLogger(run_dir, cfg.logger, enabled=True).open()
    try:
        Trainer(cfg, rt, model, objective, logger, checkpoint_meta(cfg, model_cfg, tok)).fit()
    finally:
        logger.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_contrastive_resume_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    straight = _train(tmp_path / "straight", sentences, 6, "never")
    _train(tmp_path / "resumed", sentences, 3, "never")
    resumed = _train(tmp_path / "resumed", sentences, 6, "auto")
    assert len(straight) == 6 and all(math.isfinite(v) for v in straight.values())
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: straight[s] for s in (4, 5, 6)}
    w1 = load_file(tmp_path / "straight" / "checkpoints" / "step_0000006" / "model.safetensors")
    w2 = load_file(tmp_path / "resumed" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_embed_and_sts_end_to_end(tmp_path):
    """Contrastive training from scratch, `embed` (one row per line, blank lines too), `evaluate` sts,
    and bad inputs as one line with exit 2."""
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES[:6]) + "\n\n" + "\n".join(SENTENCES[6:]) + "\n")
    run = tmp_path / "run"
    tiny = ["model=bert_tiny", "model.dropout=0.1", "data.seq_len=32", "data.batch_size=4", "trainer.progress=false"]
    proc = run_cli(
        "pretrain", "+experiment=simcse", *tiny, f"data.path={sentences}", "trainer.max_steps=4", f"hydra.run.dir={run}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "vectors.npy"
    proc = run_cli("embed", f"checkpoint={run}", f"embed.input={sentences}", f"embed.out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    vectors = np.load(out)
    assert vectors.shape == (len(sentences.read_text().splitlines()), 64) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all() and not np.allclose(vectors[0], vectors[1])

    sts = tmp_path / "sts.tsv"
    scores = [4.8, 1.0, 3.2, 0.4, 2.5, 4.0]
    sts.write_text("".join(f"{SENTENCES[i]}\t{SENTENCES[i + 6]}\t{s}\n" for i, s in enumerate(scores)))
    ev = tmp_path / "eval"
    columns = "eval.sts_columns=[1,2,3]"
    proc = run_cli("evaluate", f"checkpoint={run}", f"eval.sts_path={sts}", columns, f"hydra.run.dir={ev}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ev / "eval.json").read_text())
    assert result["tasks"] == ["sts"] and -1 <= result["sts/spearman"] <= 1 and result["sts/n"] == 6

    bad = tmp_path / "bad.tsv"
    bad.write_text("only one column\n")
    assert_user_error(
        run_cli("evaluate", f"checkpoint={run}", "eval.tasks=[sts]", f"eval.sts_path={bad}"), str(bad), "line 1"
    )


def test_embed_keys_live_in_the_embed_group():
    from llmtrain.config.moved_keys import moved_key_error

    assert moved_key_error("embed", ["input=s.txt"]) == "'input' is now 'embed.input'"
    assert moved_key_error("embed", ["out=v.npy"]) == "'out' is now 'embed.out'"
    assert moved_key_error("export", ["out=d"]) == "'out' is now 'export.out'"
