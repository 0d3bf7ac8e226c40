"""A newcomer's own files: splits that hold data.val_fraction, a separate data.val_path, a
tokenizer that never sees validation text, <unk> reported, binary files and tokenizer-less
Hugging Face directories refused with one line."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llmtrain.config.schema import DataConfig, RunConfig, TokenizerConfig
from llmtrain.data import prepare as prep
from llmtrain.data.corpus import split_documents, split_tokens, unk_report, unknown_characters
from llmtrain.data.pipeline import load_corpus, run_tokenizer
from llmtrain.data.sources import read_documents
from llmtrain.errors import UserError
from llmtrain.tokenizers.char import CharTokenizer


def _text(n: int, seed: int, alphabet: str = "abcdefgh ") -> str:
    rng = random.Random(seed)
    lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(10, 60))) for _ in range(n)]
    return "\n".join(lines) + "\n"


def _dir(tmp_path: Path, n_files: int, lines: int = 60) -> Path:
    d = tmp_path / f"corpus{n_files}"
    d.mkdir()
    for i in range(n_files):
        (d / f"{i:02d}.txt").write_text(_text(lines, i))
    return d


def _cfg(tmp_path: Path, path: Path, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data = replace(DataConfig(), path=str(path), cache_dir=str(tmp_path / "cache"), seq_len=8, **data)
    return cfg


# -- item 2: the split holds val_fraction ----------------------------------------------------
@pytest.mark.parametrize("n_files", [2, 5])
@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_directory_split_holds_val_fraction(tmp_path, n_files, fraction):
    """Two files used to give 50% validation and five 33%: now the fraction holds, in tokens."""
    data = _cfg(tmp_path, _dir(tmp_path, n_files), val_fraction=fraction).data
    docs = read_documents(data.path)
    tok = CharTokenizer.train(docs)
    splits = prep.prepare(data, tok, verbose=False).splits()
    got = len(splits.val) / (len(splits.train) + len(splits.val))
    assert got == pytest.approx(fraction, rel=0.05)
    # Nothing lost or doubled, and the prepared entry equals the in-memory split.
    assert tok.decode(np.concatenate([splits.train, splits.val]).tolist()) == "".join(docs)
    mem = split_tokens(docs, tok, fraction)
    assert np.array_equal(splits.train, mem.train) and np.array_equal(splits.val, mem.val)


def test_many_documents_stay_whole_and_the_split_is_printed(tmp_path, capsys):
    docs = [_text(3, i) for i in range(200)]
    ds = split_documents(docs, 0.1)
    assert ds.by == "document" and not ds.cut_inside and ds.train + ds.val == docs
    chars = sum(map(len, ds.val)) / sum(map(len, docs))
    assert chars == pytest.approx(0.1, rel=0.06)
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = _cfg(tmp_path, f)
    load_corpus(cfg)
    out = capsys.readouterr().out
    assert "val tokens (val 10." in out and "split document" in out, out


def test_val_path_is_the_validation_split(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(_text(40, 1))
    val.write_text(_text(10, 2))
    cfg = _cfg(tmp_path, train, val_path=str(val))
    tok, splits = load_corpus(cfg)
    assert tok.decode(splits.train.tolist()) == train.read_text()  # all of data.path trains
    assert tok.decode(splits.val.tolist()) == val.read_text()
    assert splits.val[-1] == tok.eos_id and splits.by == "val_path"
    # The tokenizer never saw the validation file: a character only it has is unknown.
    val.write_text("zzz " + val.read_text())
    tok2, splits2 = load_corpus(cfg)
    assert "z" not in tok2.chars and splits2.unk == 3


# -- item 3: the tokenizer sees the training split only --------------------------------------
def test_tokenizer_trains_on_the_training_split_only(tmp_path):
    f = tmp_path / "leak.txt"
    f.write_text(_text(200, 3) + _text(10, 4, alphabet="xyz "))  # x, y, z only in the last ~5%
    cfg = _cfg(tmp_path, f)
    tok, splits = load_corpus(cfg)
    assert not {"x", "y", "z"} & set(tok.chars) and splits.unk > 0
    # sentencepiece, trained into the cache: no piece holds a validation-only character, and
    # another split is another cache entry (the key holds the split).
    cfg.tokenizer = TokenizerConfig(name="sentencepiece", vocab_size=40, byte_fallback=False)
    docs = lambda: split_documents(read_documents(str(f)), cfg.data.val_fraction).train  # noqa: E731
    sp = run_tokenizer(cfg, docs)
    pieces = [sp.sp.id_to_piece(i) for i in range(sp.sp.get_piece_size())]
    assert not [p for p in pieces if set(p) & {"x", "y", "z"}]
    cfg2 = replace(cfg, data=replace(cfg.data, val_fraction=0.2))
    run_tokenizer(cfg2, docs)
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.model"))) == 2


def test_tokenizer_train_stage_leaves_the_validation_split_out(tmp_path, monkeypatch, capsys):
    from llmtrain.stages import tokenizer_train
    from llmtrain.tokenizers.sentencepiece import SentencePieceTokenizer

    monkeypatch.chdir(tmp_path)  # outside Hydra the run directory is the working directory
    f = tmp_path / "leak.txt"
    f.write_text(_text(200, 3) + _text(10, 4, alphabet="xyz "))
    cfg = _cfg(tmp_path, f)
    cfg.tokenizer = TokenizerConfig(name="sentencepiece", vocab_size=40, byte_fallback=False)
    tokenizer_train.run(cfg)
    assert "validation characters left out" in capsys.readouterr().out
    sp = SentencePieceTokenizer.load(tmp_path / "tokenizer.model")
    assert not [p for p in map(sp.sp.id_to_piece, range(sp.sp.get_piece_size())) if set(p) & {"x", "y", "z"}]
    files = json.loads((tmp_path / "run_info.json").read_text())["data_files"]
    assert [x["path"] for x in files] == [str(f.resolve())] and len(files[0]["sha256"]) == 64


# -- item 4: <unk> reported ------------------------------------------------------------------
def test_unknown_characters_are_reported(tmp_path, capsys):
    tok = CharTokenizer("abcdefgh \n")
    f = tmp_path / "other.txt"
    f.write_text(_text(200, 5) + "ééé—\n")
    cfg = _cfg(tmp_path, f)
    _, splits = load_corpus(cfg, tokenizer=tok)  # what finetune does with a checkpoint's tokenizer
    assert splits.unk == 4
    out = capsys.readouterr().out
    assert "<unk>" in out and "4 of" in out and "warning:" not in out  # 4 of ~7,000: under 0.1%
    assert unk_report(4, 1000, "x").startswith("warning: x: 4 of 1,000 tokens (0.40%)")
    assert unk_report(0, 1000, "x") is None
    assert unknown_characters(tok, "bad — é") == ["—", "é"]
    meta = json.loads(next((tmp_path / "cache" / "prepared").glob("*/meta.json")).read_text())
    assert meta["train"]["unk"] + meta["val"]["unk"] == 4


# -- item 8: binary files --------------------------------------------------------------------
@pytest.mark.parametrize(
    "blob",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
        b"\x7fELF\x02\x01\x01" + bytes(100),
        bytes(range(128, 256)) * 20,  # no NUL, but hardly a valid UTF-8 byte
    ],
)
def test_binary_files_are_named_binary(tmp_path, blob):
    f = tmp_path / "model.bin.txt"
    f.write_bytes(blob)
    for errors in ("strict", "replace"):
        with pytest.raises(UserError, match="is a binary file") as e:
            read_documents(str(f), errors=errors)
        assert "encoding_errors" not in str(e.value)
    # A text file with a stray bad byte is still text: the replace hint fits it.
    t = tmp_path / "latin1.txt"
    t.write_bytes(_text(20, 6).encode() + b"caf\xe9\n")
    with pytest.raises(UserError, match="encoding_errors=replace"):
        read_documents(str(t))
    assert read_documents(str(t), errors="replace")[0].endswith("caf\ufffd\n")


# -- item 7: hf:DIR without tokenizer files --------------------------------------------------
def test_hf_dir_without_tokenizer_files(tmp_path, monkeypatch):
    """It used to build a 1-token tokenizer, cache its empty shards and fail at "0 training tokens"."""
    import transformers

    from llmtrain.stages import finetune

    d = tmp_path / "hf_no_tok"
    hf_cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=40, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(str(d))
    text = tmp_path / "t.txt"
    text.write_text(_text(50, 7))
    monkeypatch.chdir(tmp_path)  # outside Hydra the run directory is the working directory
    cfg = _cfg(tmp_path, text)
    cfg.stage, cfg.init_from = "finetune", f"hf:{d}"
    with pytest.raises(UserError, match="no tokenizer files") as e:
        finetune.run(cfg)
    assert f"hf:{d}" in str(e.value) and "\n" not in str(e.value)  # the CLI prints it as one line, exit 2
    assert not (tmp_path / "cache").exists()  # no cache entry of a 1-token tokenizer


def test_eval_split_is_checked():
    from llmtrain.config import validate_config

    cfg = RunConfig(stage="evaluate")
    for ok in (None, "all", "val"):
        cfg.eval.split = ok
        validate_config(cfg)
    cfg.eval.split = "test"
    with pytest.raises(UserError, match="eval.split must be all or val"):
        validate_config(cfg)
    bad = RunConfig(stage="finetune")
    bad.task.name, bad.task.train_path, bad.data.val_path = "classification", "x.tsv", "v.txt"
    with pytest.raises(UserError, match="data.val_path is for text"):
        validate_config(bad)


def test_generate_warns_about_unknown_prompt_characters(pretrained, capsys):
    """A Shakespeare char model lacks "€": the prompt the model reads is shown, not the one typed."""
    from llmtrain.stages import generate

    cfg = RunConfig(stage="generate", checkpoint=str(pretrained))
    cfg.generate.prompt, cfg.generate.max_new_tokens = "ROMEO€:", 4
    generate.run(cfg)
    out, err = capsys.readouterr()
    assert "warning: generate.prompt: 1 of 7 tokens (14.29%) are <unk>" in err and "'€'" in err
    assert out.startswith("ROMEO\ufffd:")
    # The pretrain run recorded the file it read, with its size and sha256.
    (record,) = json.loads((pretrained / "run_info.json").read_text())["data_files"]
    assert record["path"].endswith("tinyshakespeare.txt.gz") and record["size"] > 0 and len(record["sha256"]) == 64
