"""Pretraining objectives: MLM masking statistics, NSP pairs, and training runs through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED, assert_user_error, run_cli
from llmtrain.config.schema import DataConfig, ObjectiveConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.errors import UserError
from llmtrain.objectives import build_objective
from llmtrain.objectives.mlm import Masker
from llmtrain.tokenizers.char import CharTokenizer

N_DOCS, DOC_LEN = 12, 200


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    # One distinct character per token id, enough for N_DOCS documents of unique tokens.
    return CharTokenizer("".join(chr(0x4E00 + i) for i in range(N_DOCS * DOC_LEN)))


def unique_token_docs(tok, n_docs=N_DOCS, doc_len=DOC_LEN) -> np.ndarray:
    """Document i is the token ids base + i*doc_len + [0, doc_len), each followed by eos, so a
    token tells which document it came from and where (as the corpus lays documents out)."""
    base = max(tok.special_ids) + 1
    parts = []
    for i in range(n_docs):
        parts += [np.arange(base + i * doc_len, base + (i + 1) * doc_len), [tok.eos_id]]
    return np.concatenate(parts).astype(np.uint16)


def splits_of(tokens: np.ndarray) -> TokenSplits:
    return TokenSplits(train=tokens, val=tokens, n_docs=0, val_bytes=1)


def objective(name, tok, splits, data, seed=0, **kw):
    return build_objective(ObjectiveConfig(name=name, **kw), tok, splits, data, seed)


def doc_of(tok, ids: torch.Tensor) -> torch.Tensor:
    return (ids - (max(tok.special_ids) + 1)) // DOC_LEN


# ----------------------------------------------------------------------------- MLM masking
def test_masking_statistics(tok):
    masker = Masker(tok, 0.15)
    special = torch.tensor(tok.special_ids)
    g0 = torch.Generator().manual_seed(0)
    # Text tokens with special tokens sprinkled in (a quarter of the positions).
    ids = torch.randint(max(tok.special_ids) + 1, tok.vocab_size, (64, 512), generator=g0)
    sprinkle = torch.rand(ids.shape, generator=g0) < 0.25
    ids = torch.where(sprinkle, special[torch.randint(len(special), ids.shape, generator=g0)], ids)
    is_special = torch.isin(ids, special)

    n_text = sel = masked = randomised = kept = 0
    for step in range(20):
        out, labels = masker(ids, torch.Generator().manual_seed(step))
        selected = labels != -100
        assert not (selected & is_special).any(), "special tokens must never be selected"
        assert torch.equal(out[is_special], ids[is_special])
        assert torch.equal(labels[selected], ids[selected]), "labels are the original tokens"
        assert torch.equal(out[~selected], ids[~selected]), "only selected positions change"
        changed = selected & (out != ids) & (out != tok.mask_id)
        assert not torch.isin(out[changed], special).any(), "random replacements are never special"
        assert (out[changed] < tok.vocab_size).all()
        n_text += int((~is_special).sum())
        sel += int(selected.sum())
        masked += int((selected & (out == tok.mask_id)).sum())
        randomised += int(changed.sum())
        kept += int((selected & (out == ids)).sum())

    # Binomial standard errors are below 0.001 here; tolerances are several of them.
    n_repl = tok.vocab_size - len(tok.special_ids)  # a random draw equals the original 1/n_repl of the time
    assert abs(sel / n_text - 0.15) < 0.003
    assert abs(masked / sel - 0.8) < 0.01
    assert abs(randomised / sel - 0.1 * (1 - 1 / n_repl)) < 0.01
    assert abs(kept / sel - (0.1 + 0.1 / n_repl)) < 0.01


def test_mlm_batches_layout_and_determinism(tok):
    data = DataConfig(seq_len=32, batch_size=8)
    splits = splits_of(unique_token_docs(tok))
    src = objective("mlm", tok, splits, data, seed=7).train_source()
    b = src.batch(5)
    assert (b["input_ids"][:, 0] == tok.cls_id).all() and (b["input_ids"][:, -1] == tok.sep_id).all()
    assert (b["attention_mask"] == 1).all() and (b["token_type_ids"] == 0).all()
    assert (b["labels"][:, [0, -1]] == -100).all()
    # A pure function of (seed, step): a fresh source gives the same batch; other steps/seeds differ.
    again = objective("mlm", tok, splits, data, seed=7).train_source().batch(5)
    assert all(torch.equal(b[k], again[k]) for k in b)
    assert not torch.equal(b["labels"] != -100, src.batch(6)["labels"] != -100)
    assert not torch.equal(
        b["labels"] != -100, objective("mlm", tok, splits, data, seed=8).train_source().batch(5)["labels"] != -100
    )
    # Ranks read different windows.
    rank1 = objective("mlm", tok, splits, data, seed=7).train_source(rank=1, world=2)
    assert not torch.equal(b["input_ids"], rank1.batch(5)["input_ids"])


def test_masks_redrawn_when_a_sequence_is_seen_again(tok):
    """The same window at two steps (a corpus of exactly one window) gets different masks."""
    data = DataConfig(seq_len=16, batch_size=1)
    tokens = unique_token_docs(tok, n_docs=1, doc_len=2 * 13 + 1)[: 2 * 13 + 2]  # n_windows == 1
    src = objective("mlm", tok, splits_of(tokens), data, seed=0).train_source()
    seen: dict[tuple, list[torch.Tensor]] = {}
    for step in range(40):
        b = src.batch(step)
        original = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
        seen.setdefault(tuple(original[0].tolist()), []).append(b["labels"][0] != -100)
    repeats = [masks for masks in seen.values() if len(masks) > 1]
    assert repeats, "the window should repeat across epochs"
    assert any(not torch.equal(m[0], m[1]) for m in repeats)


def test_mlm_val_batches_cover_split_and_are_deterministic(tok):
    data = DataConfig(seq_len=32, batch_size=8)
    tokens = unique_token_docs(tok, n_docs=3)
    splits = splits_of(tokens)
    first = list(objective("mlm", tok, splits, data, seed=3).val_batches())
    second = list(objective("mlm", tok, splits, data, seed=3).val_batches())
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, second) for k in x)
    other = list(objective("mlm", tok, splits, data, seed=4).val_batches())
    assert any(not torch.equal(x["labels"], y["labels"]) for x, y in zip(first, other))
    # Unmasking gives back the split in order (all but its final token), framed by [CLS] ... [SEP].
    text = []
    for b in first:
        orig = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
        for row, att in zip(orig, b["attention_mask"]):
            row = row[att.bool()]
            assert row[0] == tok.cls_id and row[-1] == tok.sep_id
            text += row[1:-1].tolist()
        assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_id).all()
    assert text == tokens[:-1].tolist()


# ----------------------------------------------------------------------------- NSP pairs
def check_pair_layout(tok, b):
    for ids, types, att in zip(b["input_ids"], b["token_type_ids"], b["attention_mask"]):
        n = int(att.sum())
        assert (att[:n] == 1).all() and (att[n:] == 0).all()
        assert (ids[n:] == tok.pad_id).all() and (types[n:] == 0).all()
        assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id
        seps = (ids[:n] == tok.sep_id).nonzero().flatten().tolist()
        assert len(seps) == 2 and 1 < seps[0] < n - 2  # both segments non-empty
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : n] == 1).all()
        yield ids[1 : seps[0]], ids[seps[0] + 1 : n - 1]


@pytest.mark.parametrize("nsp_prob", [0.5, 0.2])
def test_nsp_pairs(tok, nsp_prob):
    data = DataConfig(seq_len=48, batch_size=50)
    src = objective("nsp", tok, splits_of(unique_token_docs(tok)), data, seed=1, nsp_prob=nsp_prob).train_source()
    labels, docs_a = [], []
    for step in range(40):
        b = src.batch(step)
        for (a, bseg), label in zip(check_pair_layout(tok, b), b["next_sentence_label"].tolist()):
            da, db = doc_of(tok, a), doc_of(tok, bseg)
            assert (da == da[0]).all() and (db == db[0]).all(), "a segment is a span of one document"
            assert (a.diff() == 1).all() and (bseg.diff() == 1).all(), "a segment is contiguous"
            if label == 0:  # B is the true continuation of A
                assert bseg[0] == a[-1] + 1
            else:  # B comes from another document
                assert db[0] != da[0]
            labels.append(label)
            docs_a.append(int(da[0]))
    # 2000 pairs: the standard error of the fraction is about 0.011.
    assert abs(1 - np.mean(labels) - nsp_prob) < 0.05
    assert len(set(docs_a)) == N_DOCS, "every document is drawn"


def test_nsp_val_batches_deterministic_and_balanced(tok):
    data = DataConfig(seq_len=24, batch_size=16)
    splits = splits_of(unique_token_docs(tok))
    obj = objective("nsp", tok, splits, data, seed=0)
    first = list(obj.val_batches())
    second = list(obj.val_batches())
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, second) for k in x)
    labels = torch.cat([b["next_sentence_label"] for b in first]).float()
    assert len(labels) == N_DOCS * -(-DOC_LEN // 21)  # each document cut into 21-token spans
    assert abs(labels.mean().item() - 0.5) < 0.1
    assert len(list(obj.val_batches(max_batches=2))) == 2
    for b in first:
        list(check_pair_layout(tok, b))


def test_mlm_nsp_masks_pairs_but_not_specials(tok):
    data = DataConfig(seq_len=48, batch_size=16)
    splits = splits_of(unique_token_docs(tok))
    b = objective("mlm_nsp", tok, splits, data, seed=0).train_source().batch(0)
    plain = objective("nsp", tok, splits, data, seed=0).train_source().batch(0)
    # The same pairs as nsp, with the masked positions restored.
    restored = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
    assert torch.equal(restored, plain["input_ids"])
    assert torch.equal(b["token_type_ids"], plain["token_type_ids"])
    specials = torch.isin(plain["input_ids"], torch.tensor(tok.special_ids))
    assert not ((b["labels"] != -100) & specials).any()
    assert (b["labels"] != -100).any()


def test_mlm_loss_on_selected_positions_equals_dense_loss(tok):
    """The MLM head runs on the selected positions only; loss, accuracy and count must equal the
    dense computation (logits at every position, ignore_index -100), for mlm and mlm_nsp batches."""
    from llmtrain.config.schema import ModelConfig
    from llmtrain.models.bert import Bert
    from llmtrain.objectives.mlm import masked_lm_terms

    torch.manual_seed(0)
    model = Bert(
        ModelConfig(name="bert", vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=48)
    ).eval()
    splits, data = splits_of(unique_token_docs(tok)), DataConfig(seq_len=48, batch_size=8)
    for name in ("mlm", "mlm_nsp"):
        b = objective(name, tok, splits, data, seed=3).train_source().batch(2)
        assert torch.equal(b["mlm_positions"], (b["labels"].view(-1) != -100).nonzero().squeeze(1))
        with torch.no_grad():
            hidden = model.encode(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            ce, correct, n = masked_lm_terms(model, hidden, b)
            dense = model.lm_logits(hidden)
        labels = b["labels"]
        want = torch.nn.functional.cross_entropy(
            dense.reshape(-1, dense.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        assert int(n) == int((labels != -100).sum()) > 0
        assert torch.allclose(ce, want, rtol=1e-5), (ce, want)
        assert int(correct) == int(((dense.argmax(-1) == labels) & (labels != -100)).sum())


def test_nsp_needs_several_documents(tok):
    one_doc = splits_of(unique_token_docs(tok, n_docs=1))
    obj = objective("nsp", tok, one_doc, DataConfig(seq_len=32, batch_size=4), seed=0)
    with pytest.raises(UserError, match="2 documents"):
        obj.train_source()


# ----------------------------------------------------------------------------- through the CLI
def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not (SHARED / "wikitext2" / "valid.txt").exists(), reason="needs shared WikiText-2")
def test_bert_mlm_nsp_pretrain_cli(tmp_path):
    proc = run_cli(
        "pretrain",
        "model=bert_tiny",
        "objective=mlm_nsp",
        "data=wikitext2",
        f"data.path={SHARED / 'wikitext2' / 'valid.txt'}",
        "data.seq_len=64",
        "data.batch_size=16",
        "trainer.max_steps=40",
        "trainer.eval_every=20",
        "trainer.eval_batches=4",
        "trainer.log_every=10",
        "trainer.progress=false",
        "optim.lr=2e-3",
        "scheduler.warmup_steps=5",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path)
    train = [r["train/loss"] for r in records if "train/loss" in r]
    assert train[-1] < train[0] - 0.3, train
    vals = [r for r in records if "val/loss" in r]
    assert len(vals) == 2
    for key in ("val/mlm_loss", "val/nsp_loss", "val/mlm_accuracy", "val/nsp_accuracy"):
        assert key in vals[-1], vals[-1]
    assert 0.0 <= vals[-1]["val/mlm_accuracy"] <= 1.0 and 0.0 <= vals[-1]["val/nsp_accuracy"] <= 1.0
    # training logs the objective's components too; they add up to the logged loss (up to how
    # steps are weighted: components by their target counts, the loss by step)
    last_train = [r for r in records if "train/loss" in r][-1]
    for key in ("train/mlm_loss", "train/nsp_loss", "train/mlm_accuracy", "train/nsp_accuracy"):
        assert key in last_train, last_train
    assert (
        abs(last_train["train/mlm_loss"] + last_train["train/nsp_loss"] - last_train["train/loss"])
        < 0.02 * last_train["train/loss"]
    )


def test_llama_clm_pretrain_cli(tmp_path):
    proc = run_cli(
        "pretrain",
        "model=llama_tiny",
        "data.seq_len=32",
        "data.batch_size=8",
        "trainer.max_steps=30",
        "trainer.eval_every=30",
        "trainer.eval_batches=4",
        "trainer.log_every=5",
        "trainer.progress=false",
        "optim.lr=3e-3",
        "scheduler.warmup_steps=5",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert train[-1] < train[0] - 0.3, train
    config = (tmp_path / "config.yaml").read_text()
    assert "name: llama" in config and "n_kv_heads: 2" in config


@pytest.mark.parametrize(
    "model, objective, needle",
    [
        ("gpt_tiny", "mlm", "objective=mlm"),
        ("bert_tiny", "clm", "objective=clm"),
    ],
)
def test_objective_model_mismatch_is_user_error(tmp_path, model, objective, needle):
    proc = run_cli(
        "pretrain", f"model={model}", f"objective={objective}", "trainer.max_steps=1", f"hydra.run.dir={tmp_path}"
    )
    assert_user_error(proc, needle)


def test_nsp_on_single_document_is_user_error(tmp_path):
    proc = run_cli(
        "pretrain",
        "model=bert_tiny",
        "objective=nsp",
        "data=shakespeare",
        "data.seq_len=32",
        "trainer.max_steps=1",
        "trainer.progress=false",
        f"hydra.run.dir={tmp_path}",
    )
    assert_user_error(proc, "documents")
