"""Tokenizers: byte, sentencepiece (training, loading, state round trip) and build_tokenizer."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import pytest

from llmtrain.config.schema import TokenizerConfig
from llmtrain.errors import UserError
from llmtrain.tokenizers import SPECIAL_TOKENS, tokenizer_from_state
from llmtrain.tokenizers.byte import ByteTokenizer
from llmtrain.tokenizers.char import CharTokenizer
from llmtrain.tokenizers.sentencepiece import SentencePieceTokenizer
from llmtrain.tokenizers.train import build_tokenizer, train_sentencepiece

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
HELD_OUT = "ROMEO:\nBut soft, what light through yonder window breaks?\n  It is the east.\n"


def _corpus() -> str:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    # Fallback so the tests still run without the shared data.
    words = "the king and queen of england speak to thee my lord good night sweet prince".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(10 + i % 5)) for i in range(4000)]
    return "\n".join(f"CITIZEN {i % 9}:\n{ln}." for i, ln in enumerate(lines))


@pytest.fixture(scope="module")
def corpus() -> str:
    return _corpus()


@pytest.fixture(scope="module")
def docs(corpus: str) -> list[str]:
    # A few "documents" so the trainer sees several strings, as from a real corpus.
    n = len(corpus) // 4
    return [corpus[i * n : (i + 1) * n] for i in range(4)]


def _cfg(**kw) -> TokenizerConfig:
    return replace(TokenizerConfig(name="sentencepiece"), **{"vocab_size": 400, **kw})


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, docs) -> SentencePieceTokenizer:
    out = tmp_path_factory.mktemp("bpe") / "tok.model"
    return train_sentencepiece(docs, _cfg(), out)


# -- byte ------------------------------------------------------------------------------------


def test_byte_round_trip_unicode():
    tok = ByteTokenizer()
    assert tok.vocab_size == 263
    for i, key in enumerate(SPECIAL_TOKENS):
        assert getattr(tok, f"{key}_id") == i
    text = "héllo wörld\n\t日本語 😀 \u200b\x00 [CLS] end"
    ids = tok.encode(text)
    assert all(7 <= i < 263 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    # specials and out-of-vocab ids (padded model vocab) are dropped; broken UTF-8 -> U+FFFD
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, 300]) == text
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    assert tok.encode_batch(["a", ""]) == [[ord("a") + 7], []]
    assert ByteTokenizer.train(["anything"], None).state() == tok.state()
    again = tokenizer_from_state(json.loads(json.dumps(tok.state())))
    assert isinstance(again, ByteTokenizer) and again.fingerprint() == tok.fingerprint()


# -- sentencepiece: training and the contract ------------------------------------------------


def test_bpe_round_trip_and_files(bpe: SentencePieceTokenizer):
    assert bpe.vocab_size == 400
    ids = bpe.encode(HELD_OUT)
    assert 0 < len(ids) < len(HELD_OUT)  # it actually merges
    assert bpe.decode(ids) == HELD_OUT  # lossless: identity normalisation, spaces and newlines kept
    assert bpe.bos_id not in ids and bpe.eos_id not in ids  # encode adds no bos/eos
    assert bpe.encode_batch([HELD_OUT, "", "a b"]) == [ids, [], bpe.encode("a b")]

    path = Path(bpe.path)
    assert path.exists() and path.suffix == ".model"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["settings"]["model_type"] == "bpe"
    assert meta["stats"]["vocab_size"] == 400
    assert meta["stats"]["training_chars"] > 100_000
    assert meta["fingerprint"] == bpe.fingerprint()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_special_ids_are_real_pieces(bpe: SentencePieceTokenizer):
    expected = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 4, "sep": 5, "mask": 6}
    for key, piece in SPECIAL_TOKENS.items():
        i = getattr(bpe, f"{key}_id")
        assert i == expected[key]
        assert bpe.id_to_piece(i) == piece
    assert bpe.special_ids == list(range(7))
    assert bpe.encode("[MASK]") == [bpe.mask_id]
    # specials are dropped on decode, out-of-range ids (padded model vocab) ignored
    ids = bpe.encode("to be")
    assert bpe.decode([bpe.cls_id, *ids, bpe.sep_id, bpe.pad_id, bpe.eos_id, 10_000]) == "to be"


def test_state_round_trip_without_file(bpe: SentencePieceTokenizer, tmp_path):
    state = json.loads(json.dumps(bpe.state()))  # JSON-serialisable, as in a checkpoint
    assert state["name"] == "sentencepiece" and state["path"] == bpe.path
    # rebuildable without the original file
    moved = tmp_path / "gone.model"
    Path(bpe.path).replace(moved)
    try:
        again = tokenizer_from_state(state)
    finally:
        moved.replace(bpe.path)
    assert isinstance(again, SentencePieceTokenizer)
    assert again.vocab_size == bpe.vocab_size
    assert again.encode(HELD_OUT) == bpe.encode(HELD_OUT)
    assert again.fingerprint() == bpe.fingerprint()
    unpickled = pickle.loads(pickle.dumps(bpe))
    assert unpickled.encode(HELD_OUT) == bpe.encode(HELD_OUT)


def test_load_same_model_same_fingerprint(bpe: SentencePieceTokenizer, tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(Path(bpe.path).read_bytes())
    loaded = SentencePieceTokenizer.load(copy)
    assert loaded.fingerprint() == bpe.fingerprint()  # location does not matter
    assert loaded.encode(HELD_OUT) == bpe.encode(HELD_OUT)


def test_unigram_and_fingerprint_differs(bpe: SentencePieceTokenizer, docs, tmp_path):
    uni = train_sentencepiece(docs, _cfg(model_type="unigram"), tmp_path / "uni.model")
    assert uni.vocab_size == 400
    assert json.loads((tmp_path / "uni.json").read_text())["settings"]["model_type"] == "unigram"
    assert uni.decode(uni.encode(HELD_OUT)) == HELD_OUT
    assert uni.mask_id == 6 and uni.id_to_piece(uni.cls_id) == "[CLS]"
    assert uni.fingerprint() != bpe.fingerprint()


def test_byte_fallback_unseen_characters(bpe: SentencePieceTokenizer):
    text = "café 😀 naïve — 日本"
    ids = bpe.encode(text)
    assert bpe.unk_id not in ids
    pieces = [bpe.id_to_piece(i) for i in ids]
    assert "<0xC3>" in pieces and "<0xF0>" in pieces  # é and 😀 as UTF-8 bytes
    assert bpe.decode(ids) == text


def test_without_byte_fallback_unseen_is_unk(docs, tmp_path):
    tok = train_sentencepiece(docs, _cfg(byte_fallback=False, vocab_size=300), tmp_path / "nofb.model")
    ids = tok.encode("a😀b")
    assert tok.unk_id in ids
    assert tok.decode(ids) == "a\ufffdb"
    assert tok.decode(tok.encode("x\ny\tz")) == "x\ny\tz"  # newline/tab are pieces of their own


def test_vocab_too_large_is_user_error(docs, tmp_path):
    out = tmp_path / "big.model"
    with pytest.raises(UserError, match=r"tokenizer\.vocab_size") as ei:
        train_sentencepiece(docs[:1], _cfg(vocab_size=200_000), out)
    assert "too large" in str(ei.value)
    assert not out.exists()
    with pytest.raises(UserError, match=r"tokenizer\.vocab_size.*too small"):
        train_sentencepiece(docs[:1], _cfg(vocab_size=50), out)


@pytest.mark.parametrize("texts", [[], [""], ["   \n\t\n", "  "]])
def test_empty_corpus_is_user_error(texts, tmp_path):
    with pytest.raises(UserError, match="empty"):
        train_sentencepiece(texts, _cfg(), tmp_path / "empty.model")
    assert not (tmp_path / "empty.model").exists()


def test_bad_settings_are_user_errors(docs, tmp_path):
    with pytest.raises(UserError, match=r"tokenizer\.model_type"):
        train_sentencepiece(docs, _cfg(model_type="wordpiece"), tmp_path / "x.model")


def test_corpus_errors_propagate(tmp_path):
    def texts():
        yield "some text here\n"
        raise UserError("data.path: broken.txt is not UTF-8")

    with pytest.raises(UserError, match="broken.txt"):
        train_sentencepiece(texts(), _cfg(), tmp_path / "x.model")


def test_garbage_or_missing_model_file(tmp_path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is definitely not a sentencepiece model \x00\xff" * 10)
    with pytest.raises(UserError, match="garbage.model"):
        SentencePieceTokenizer.load(garbage)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.model"):
        SentencePieceTokenizer.load(empty)
    with pytest.raises(UserError, match="missing.model"):
        SentencePieceTokenizer.load(tmp_path / "missing.model")
    with pytest.raises(UserError, match="garbage.model"):
        build_tokenizer(_cfg(path=str(garbage)), lambda: ["unused"])


# -- build_tokenizer -------------------------------------------------------------------------


def test_build_tokenizer(bpe: SentencePieceTokenizer, docs, tmp_path, capsys):
    def no_corpus():
        raise AssertionError("loading a tokenizer must not read the corpus")

    assert isinstance(build_tokenizer(TokenizerConfig(name="byte"), no_corpus), ByteTokenizer)
    char = build_tokenizer(TokenizerConfig(name="char"), lambda: ["abc", "cd"])
    assert isinstance(char, CharTokenizer) and char.chars == "abcd"

    loaded = build_tokenizer(_cfg(path=bpe.path), no_corpus)
    assert loaded.fingerprint() == bpe.fingerprint()

    # path set but missing: train it there
    target = tmp_path / "sub" / "new.model"
    tok = build_tokenizer(_cfg(path=str(target), vocab_size=350), lambda: docs[:1])
    assert target.exists() and target.with_suffix(".json").exists() and tok.vocab_size == 350
    err = capsys.readouterr().err
    assert f"training sentencepiece tokenizer (vocab 350) -> {target}" in err

    # path unset: train to the default path
    default = tmp_path / "run" / "tokenizer.model"
    tok = build_tokenizer(_cfg(vocab_size=350), lambda: docs[:1], default_path=default)
    assert default.exists() and tok.path == str(default)

    with pytest.raises(UserError, match=r"tokenizer\.path"):
        build_tokenizer(_cfg(), lambda: docs[:1])


def test_trained_tokenizer_files_have_the_default_mode(tmp_path):
    import os

    from llmtrain import files

    old = os.umask(0o027)  # not the usual 022: the mode follows the umask, it is not hard-coded
    files.file_mode.cache_clear()
    try:
        text = "the quick brown fox jumps over the lazy dog. " * 200
        train_sentencepiece([text], TokenizerConfig(name="sentencepiece", vocab_size=320), tmp_path / "sp.model")
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
        files.file_mode.cache_clear()
    assert modes == {"sp.model": 0o640, "sp.json": 0o640}
