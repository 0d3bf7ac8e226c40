"""Tokenizers on the Hugging Face `tokenizers` library: tokenizer=wordpiece and tokenizer=bpe
(trained by llmtrain), tokenizer=hf (a local HF tokenizer directory); their state, cache, export
(AutoTokenizer gives the same ids) and the BERT objectives on WordPiece specials."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import SHARED, assert_user_error, run_cli
from llmtrain.config.schema import DataConfig, ObjectiveConfig, RunConfig, TokenizerConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.errors import UserError
from llmtrain.tokenizers import SPECIAL_TOKENS, tokenizer_from_state
from llmtrain.tokenizers.hf import HFTokenizer
from llmtrain.tokenizers.hf_train import ByteLevelBPETokenizer, WordPieceTokenizer, meta_path, train_hf
from llmtrain.tokenizers.train import build_tokenizer

transformers = pytest.importorskip("transformers")

SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
WIKITEXT = SHARED / "wikitext2" / "valid.txt"
# newlines, tabs, runs of spaces, accents, CJK, emoji, combining marks, RTL, special-token spellings
UNICODE = (
    "ROMEO:\n\tBut soft!  what   light?\n\n  Héllo — 日本語のテキスト 🤖🚀 naïve CAFÉ Ünïcödé 1234 "
    "e\u0301 Ελληνικά Русский עברית العربية ß ﬁ <x> [CLS] a[SEP]b <s>x</s> <pad>[MASK] [UNK] <unk>\n"
)


def corpus(n: int = 80_000) -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:n]
    return [text[: n // 2], text[n // 2 :]]


def cfg(name: str, **kw) -> TokenizerConfig:
    return replace(TokenizerConfig(name=name), **{"vocab_size": 500, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("hftok")
    return {
        "bpe": train_hf(corpus(), cfg("bpe"), d / "bpe.json"),
        "wordpiece": train_hf(corpus(), cfg("wordpiece", lowercase=True), d / "wordpiece.json"),
    }


def test_bpe_is_byte_level_and_lossless(trained):
    tok = trained["bpe"]
    assert isinstance(tok, ByteLevelBPETokenizer) and tok.vocab_size == 500
    # llmtrain's specials at ids 0-6, in their order
    assert [getattr(tok, f"{k}_id") for k in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = corpus()[1][-500:] + UNICODE
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: every character round-trips, none is unknown
    assert not set(ids) & set(tok.special_ids)  # "<s>", "[MASK]" typed in text are text
    english = corpus()[1][-500:]
    assert len(tok.encode(english)) < len(english.encode()) / 2  # merges were learned
    # GPT-2's byte symbols: "Ġ" marks a leading space
    assert any(tok.tk.id_to_token(i).startswith("Ġ") for i in ids)


def test_wordpiece_bert_style(trained, tmp_path):
    tok = trained["wordpiece"]
    assert isinstance(tok, WordPieceTokenizer)
    pieces = {k: tok.tk.id_to_token(getattr(tok, f"{k}_id")) for k in SPECIAL_TOKENS}
    assert pieces == {
        "pad": "[PAD]",
        "unk": "[UNK]",
        "bos": "[CLS]",
        "eos": "[SEP]",
        "cls": "[CLS]",
        "sep": "[SEP]",
        "mask": "[MASK]",
    }
    assert tok.tk.id_to_token(tok.encode("thoughtfulnesses")[1]).startswith("##")
    # lowercase (and accents stripped, as bert-base-uncased)
    assert tok.encode("ROMEO Héllo") == tok.encode("romeo hello")
    assert tok.decode(tok.encode("ROMEO:  But soft!")) == "romeo : but soft!"
    ids = tok.encode(UNICODE)
    assert tok.mask_id not in ids and tok.cls_id not in ids  # "[MASK]" typed in text is text
    # reproducible: the same corpus and settings give the same tokenizer (HF's own WordPiece
    # trainer numbers pieces in hash-map order and does not)
    assert train_hf(corpus(), cfg("wordpiece", lowercase=True)).state() == tok.state()
    cased = train_hf(corpus(), cfg("wordpiece", lowercase=False), tmp_path / "cased.json")
    assert cased.encode("ROMEO") != cased.encode("romeo")
    assert cased.fingerprint() != tok.fingerprint()


@pytest.mark.parametrize("name", ["bpe", "wordpiece"])
def test_state_file_and_pickle_round_trip(trained, name, tmp_path):
    tok = trained[name]
    text = corpus()[1][-300:] + UNICODE
    ids = tok.encode(text)
    for again in (tokenizer_from_state(json.loads(json.dumps(tok.state()))), pickle.loads(pickle.dumps(tok))):
        assert type(again) is type(tok) and again.encode(text) == ids and again.fingerprint() == tok.fingerprint()
    assert tok.encode_batch([text, "a"]) == [ids, tok.encode("a")]
    # the file it wrote, and its settings sidecar
    path = tmp_path / "t.json"
    train_hf(corpus(), cfg(name, lowercase=True), path)
    loaded = build_tokenizer(cfg(name, path=str(path)), lambda: pytest.fail("loading must not read the corpus"))
    assert loaded.fingerprint() == tok.fingerprint()
    meta = json.loads(meta_path(path).read_text())
    assert meta["settings"]["vocab_size"] == 500 and meta["fingerprint"] == tok.fingerprint()


def test_extra_special_tokens(tmp_path):
    tok = train_hf(corpus(20_000), cfg("bpe", special_tokens=["<|im_start|>", "<|im_end|>"]))
    assert tok.piece_id("<|im_start|>") == 7 and tok.piece_id("<|im_end|>") == 8
    assert 7 not in tok.encode("<|im_start|>user")  # typed in text: ordinary bytes


def test_bad_settings_and_files(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer\.vocab_size=200 is too small for tokenizer=bpe"):
        train_hf(corpus(), cfg("bpe", vocab_size=200))
    with pytest.raises(UserError, match="empty"):
        train_hf(["  \n", ""], cfg("wordpiece"))
    bpe_file = tmp_path / "bpe.json"
    train_hf(corpus(20_000), cfg("bpe"), bpe_file)
    with pytest.raises(UserError, match="a BPE tokenizer, not WordPiece"):
        build_tokenizer(cfg("wordpiece", path=str(bpe_file)), lambda: [])
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json")
    with pytest.raises(UserError, match="garbage.json: not a Hugging Face tokenizer.json"):
        build_tokenizer(cfg("bpe", path=str(garbage)), lambda: [])


def test_hf_dir_errors(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer=hf needs tokenizer\.path"):
        build_tokenizer(TokenizerConfig(name="hf"), lambda: [])
    with pytest.raises(UserError, match="does not exist"):
        build_tokenizer(TokenizerConfig(name="hf", path=str(tmp_path / "nope")), lambda: [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        build_tokenizer(TokenizerConfig(name="hf", path=str(tmp_path / "empty")), lambda: [])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(UserError, match="cannot load the Hugging Face tokenizer"):
        build_tokenizer(TokenizerConfig(name="hf", path=str(bad)), lambda: [])


# ----------------------------------------------------------------------------- export
def export_dir(tok, d: Path) -> Path:
    from llmtrain.hf.tokenizer import save_tokenizer

    save_tokenizer(tok, d)
    return d


@pytest.mark.parametrize("name", ["bpe", "wordpiece", "hf"])
def test_export_autotokenizer_same_ids(trained, name, tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[-3000:] + UNICODE * 3
    if name == "hf":
        # tokenizer=hf on an exported directory (here: a byte-level BPE's) reproduces its ids
        source = trained["bpe"]
        tok = build_tokenizer(
            TokenizerConfig(name="hf", path=str(export_dir(source, tmp_path / "src"))),
            lambda: pytest.fail("tokenizer=hf must not read the corpus"),
        )
        assert isinstance(tok, HFTokenizer) and tok.name == "hf"
        assert tok.encode(text) == source.encode(text)
    else:
        tok = trained[name]
    out = export_dir(tok, tmp_path / "export")
    assert (out / "tokenizer.json").is_file()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.is_fast
    ids = tok.encode(text)
    assert (tok.unk_id in ids) == (name == "wordpiece")  # WordPiece lacks some of these characters
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    assert (hf_tok.pad_token_id, hf_tok.mask_token_id) == (tok.pad_id, tok.mask_id)
    # and the exported directory back as tokenizer=hf: the same ids again
    again = HFTokenizer.from_dir(str(out))
    assert again.encode(text) == ids


# ----------------------------------------------------------------------------- BERT objectives
def test_wordpiece_specials_frame_mlm_nsp_batches(trained):
    from llmtrain.data.corpus import token_dtype
    from llmtrain.objectives import build_objective

    tok = trained["wordpiece"]
    docs = WIKITEXT.read_text(encoding="utf-8")[:40_000].split(" = = ")
    tokens = []
    for doc in docs:
        tokens += tok.encode(doc) + [tok.eos_id]
    arr = torch.tensor(tokens).numpy().astype(token_dtype(tok.vocab_size))
    splits = TokenSplits(train=arr, val=arr, n_docs=len(docs), val_bytes=1)
    data = DataConfig(seq_len=64, batch_size=16)
    b = build_objective(ObjectiveConfig(name="mlm_nsp"), tok, splits, data, 0).train_source().batch(0)
    assert (b["input_ids"][:, 0] == tok.cls_id).all()  # [CLS] A [SEP] B [SEP]
    assert ((b["input_ids"] == tok.sep_id).sum(1) >= 2).all()
    masked = b["labels"] != -100
    assert masked.any() and (b["input_ids"][masked] == tok.mask_id).float().mean() > 0.6  # BERT's 80%
    assert not torch.isin(b["labels"][masked], torch.tensor(tok.special_ids)).any()
    assert set(b["next_sentence_label"].tolist()) == {0, 1}
    m = build_objective(ObjectiveConfig(name="mlm"), tok, splits, data, 0).train_source().batch(0)
    assert (m["input_ids"] == tok.mask_id).any() and not (m["input_ids"] == tok.unk_id).all()


def run_in_process(stage: str, overrides: list[str]) -> None:
    """A stage composed and run as the CLI does, in this process (no interpreter start-up)."""
    import importlib

    from llmtrain.config import compose, register_configs

    register_configs()
    name = stage.replace(" ", "_")
    with compose.hydra_session(name):
        composed = compose.compose_run(name, overrides)
        run_cfg = compose.validate(composed)
        module = importlib.import_module(f"llmtrain.stages.{'pretrain' if stage == 'pretrain' else name}")
        compose.run_composed(lambda _: module.run(run_cfg), composed, configure_logging=False)


def test_tiny_bert_pretrains_on_wordpiece_with_mlm_nsp(tmp_path, capsys):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(WIKITEXT.read_text(encoding="utf-8")[:120_000])
    common = ["data=wikitext2", f"data.path={wiki}", f"data.cache_dir={tmp_path / 'cache'}"]
    common += ["tokenizer=wordpiece", "tokenizer.vocab_size=600"]
    # `tokenizer train` writes the tokenizer.json that pretrain then loads
    run_in_process("tokenizer train", [*common, f"hydra.run.dir={tmp_path / 'tok'}"])
    tok_file = tmp_path / "tok" / "tokenizer.json"
    assert tok_file.is_file() and meta_path(tok_file).is_file()
    run_dir = tmp_path / "bert"
    run_in_process(
        "pretrain",
        [
            *common,
            f"tokenizer.path={tok_file}",
            "model=bert_tiny",
            "objective=mlm_nsp",
            "data.seq_len=32",
            "data.batch_size=8",
            "trainer.max_steps=4",
            "trainer.eval_every=4",
            "trainer.eval_batches=2",
            "trainer.progress=false",
            "trainer.log_every=2",
            f"hydra.run.dir={run_dir}",
        ],
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val/loss" in r][-1]
    assert last["step"] == 4 and "val/nsp_accuracy" in last and "val/mlm_accuracy" in last
    from llmtrain.checkpoints import load

    assert load(str(run_dir)).tokenizer.fingerprint() == WordPieceTokenizer.load(tok_file).fingerprint()


def test_pretrain_cache_trains_once(tmp_path, capsys):
    from llmtrain.data.pipeline import run_tokenizer

    text = tmp_path / "a.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30_000])
    run_cfg = RunConfig()
    run_cfg.data.path, run_cfg.data.cache_dir = str(text), str(tmp_path / "cache")
    run_cfg.tokenizer = cfg("bpe", vocab_size=400)
    docs = corpus(30_000)
    first = run_tokenizer(run_cfg, docs)
    second = run_tokenizer(run_cfg, lambda: pytest.fail("a cached tokenizer is not retrained"))
    assert first.fingerprint() == second.fingerprint()
    out = capsys.readouterr().out
    assert "training bpe tokenizer" in out and "using bpe tokenizer" in out
    run_cfg.tokenizer = cfg("bpe", vocab_size=450)  # other settings: another cache entry
    assert run_tokenizer(run_cfg, docs).vocab_size == 450


def test_cli_bad_tokenizer_path_exits_2(tmp_path):
    proc = run_cli(
        "pretrain",
        "tokenizer=hf",
        f"tokenizer.path={tmp_path / 'missing'}",
        f"data.path={SHAKESPEARE}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_user_error(proc, "tokenizer.path=", "missing", "does not exist")
    assert not (tmp_path / "run" / "checkpoints").exists()
