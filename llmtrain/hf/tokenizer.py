"""Our tokenizers as Hugging Face fast tokenizers (a `tokenizers` pipeline that gives the same
ids), and the side file that lets an exported directory round-trip our tokenizer exactly.

- char: WordLevel over the characters, a pre-tokenizer that isolates every character.
- byte: ByteLevel (GPT-2's byte -> printable-char map, no regex split) + a BPE with no merges
  whose vocabulary is the 256 byte symbols at ids 7..262: every byte becomes one token.
- hf, wordpiece, bpe: their own `tokenizers` pipeline, unchanged.
- sentencepiece: the pieces and scores of the model proto as a BPE (merges ordered by piece
  score, as sentencepiece merges) or Unigram model with byte fallback; " " -> "▁" and words
  split as sentencepiece's SplitIntoWords does with allow_whitespace_only_pieces.

Special tokens (<pad> <unk> <s> </s> [CLS] [SEP] [MASK]) are registered as HF special tokens,
and every export sets split_special_tokens=True: as in ours, "<unk>" or "<s>" typed in text (as
WikiText writes it) is ordinary characters. sentencepiece matches its user-defined
[CLS]/[SEP]/[MASK] in text, so its export adds them as ordinary tokens, which HF matches too (and
does not name them cls/sep/mask tokens: transformers would make them special again on load).
A unigram export keeps HF's lattice off the control and byte pieces, which sentencepiece's never
takes for text that spells them ("<s>", "<0x41>"): they get a score no ordinary segmentation loses
to, and characters that only they contain are split off before the lattice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError
from llmtrain.tokenizers.base import SPECIAL_TOKENS, Tokenizer

SIDE_FILE = "llmtrain_tokenizer.json"  # our tokenizer state, preferred on import


def _special_kwargs() -> dict[str, str]:
    s = SPECIAL_TOKENS
    return dict(
        pad_token=s["pad"],
        unk_token=s["unk"],
        bos_token=s["bos"],
        eos_token=s["eos"],
        cls_token=s["cls"],
        sep_token=s["sep"],
        mask_token=s["mask"],
    )


def _char_pipeline(tok) -> Any:
    from tokenizers import Regex, Tokenizer as TkTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tok.itos)}
    t = TkTokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    # [\s\S]: every code point, newlines included (Python str indexes code points too)
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return t


def _byte_pipeline(tok) -> Any:
    from tokenizers import Tokenizer as TkTokenizer, decoders, models, pre_tokenizers

    # byte b -> the printable stand-in ByteLevel maps it to (GPT-2's bytes_to_unicode)
    b2u = _bytes_to_unicode()
    offset = len(SPECIAL_TOKENS)
    vocab = {v: i for i, v in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({b2u[b]: offset + b for b in range(256)})
    t = TkTokenizer(models.BPE(vocab, [], unk_token=None, fuse_unk=False))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return t


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> unicode map (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _sentencepiece_pipeline(tok) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer as TkTokenizer, decoders, models, normalizers, pre_tokenizers

    m = pb.ModelProto()
    m.ParseFromString(tok.model_proto)
    ts, ns = m.trainer_spec, m.normalizer_spec
    where = tok.path or "sentencepiece model"
    if ns.add_dummy_prefix or ns.remove_extra_whitespaces or ns.precompiled_charsmap:
        raise UserError(
            f"{where}: only sentencepiece models trained by llmtrain (identity normalization, "
            "no dummy prefix) can be exported with an equivalent HF tokenizer"
        )
    if ts.treat_whitespace_as_suffix or not ts.split_by_whitespace:
        raise UserError(f"{where}: sentencepiece whitespace-suffix / no-split models have no exact HF equivalent")
    NORMAL, UNKNOWN, CONTROL, USER, BYTE = 1, 2, 3, 4, 6  # sentencepiece piece types
    NEVER = -1e6
    pieces = [(p.piece, p.score, p.type) for p in m.pieces]
    unk = SPECIAL_TOKENS["unk"]
    if ts.model_type == pb.TrainerSpec.BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        # sentencepiece merges the adjacent pair whose concatenation has the highest score: a
        # merge's rank is its result's score order (ties: lower id first, as in HF's extractor)
        order = sorted(((-s, i, p) for i, (p, s, ty) in enumerate(pieces) if ty == NORMAL and len(p) > 1))
        merges = []
        for _, _, p in order:  # per piece, its splits in (left id, right id) order
            splits = [(vocab[p[:k]], vocab[p[k:]]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
            merges.extend((pieces[a][0], pieces[b][0]) for a, b in sorted(splits))
        model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=ts.byte_fallback)
    elif ts.model_type == pb.TrainerSpec.UNIGRAM:
        # sentencepiece's lattice never uses unknown, control or byte pieces for text that spells
        # them ("<s>", "<0x41>"); HF's may, so they get a score no path of ordinary pieces loses
        # to (byte fallback looks byte pieces up by name, not by score)
        hidden = (UNKNOWN, CONTROL, BYTE)
        scored = [(p, NEVER if ty in hidden else s) for p, s, ty in pieces]
        model = models.Unigram(scored, unk_id=tok.unk_id, byte_fallback=ts.byte_fallback)
    else:
        raise UserError(f"{where}: sentencepiece model type {ts.model_type} has no HF export (bpe and unigram do)")
    t = TkTokenizer(model)
    t.normalizer = normalizers.Replace(" ", "▁")
    # sentencepiece's SplitIntoWords (allow_whitespace_only_pieces): a word is a run of "▁" and
    # the non-space text after it
    split = r"▁*[^▁]+|▁+" if ts.allow_whitespace_only_pieces else r"▁[^▁]*|[^▁]+"
    words = pre_tokenizers.Split(Regex(split), behavior="isolated")
    # a character no ordinary piece contains is its own node in sentencepiece's lattice (unknown:
    # byte fallback), so HF must not reach a control or byte piece through it ("<" of "<s>")
    known = {c for p, _, ty in pieces if ty in (NORMAL, USER) for c in p}
    lone = sorted({c for p, _, ty in pieces if ty in (UNKNOWN, CONTROL, BYTE) for c in p} - known)
    if ts.model_type == pb.TrainerSpec.UNIGRAM and lone:
        isolate = pre_tokenizers.Split(Regex("[" + "".join(re.escape(c) for c in lone) + "]"), behavior="isolated")
        words = pre_tokenizers.Sequence([words, isolate])
    t.pre_tokenizer = words
    # ours drop [CLS]/[SEP]/[MASK] when decoding; here they are ordinary tokens (see to_hf_tokenizer)
    dropped = [decoders.Replace(SPECIAL_TOKENS[k], "") for k in ("cls", "sep", "mask")]
    t.decoder = decoders.Sequence([*dropped, decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # user-defined pieces ([CLS] ... "\n" "\t") are matched in raw text by both, before splitting
    from tokenizers import AddedToken

    # ([CLS]/[SEP]/[MASK] too: added here as non-special, they stay matched in text when the
    # tokenizer is told not to match its special tokens, see to_hf_tokenizer)
    user = [AddedToken(p, special=False, normalized=False, single_word=False) for p, _, ty in pieces if ty == USER]
    if user:
        t.add_tokens(user)
    return t


PIPELINES = {"char": _char_pipeline, "byte": _byte_pipeline, "sentencepiece": _sentencepiece_pipeline}


def to_hf_tokenizer(tok: Tokenizer):
    """A transformers fast tokenizer that gives the same ids as `tok` (UserError if impossible)."""
    from transformers import PreTrainedTokenizerFast

    build = PIPELINES.get(tok.name)
    # hf (imported), wordpiece and bpe (trained with `tokenizers`) already are a HF pipeline
    is_hf = hasattr(tok, "hf_pipeline")
    if build is None:
        if is_hf:
            pipeline = tok.hf_pipeline()
        else:
            raise UserError(
                f"tokenizer {tok.name!r} has no Hugging Face equivalent "
                f"(exportable: {', '.join(sorted(PIPELINES))}, hf, wordpiece, bpe)"
            )
    else:
        pipeline = build(tok)
    kwargs: dict[str, Any] = tok.hf_special_kwargs() if is_hf else _special_kwargs()
    if tok.name == "sentencepiece":
        # sentencepiece matches its user-defined [CLS]/[SEP]/[MASK] in text: its pipeline added
        # them as ordinary tokens, which HF matches too. Named as HF special tokens they would be
        # made special again on load (transformers 5), and so spelled out like "<s>" below.
        for key in ("cls_token", "sep_token", "mask_token"):
            kwargs.pop(key)
    # Ours read "<s>", "<unk>", "<pad>", "</s>" (and char/byte "[CLS]") typed in text as
    # characters: tell HF not to match special tokens in text.
    split = tok.name in ("char", "byte", "sentencepiece") or getattr(tok, "split_special_tokens", False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=pipeline, clean_up_tokenization_spaces=False, split_special_tokens=split, **kwargs
    )
    hf.add_bos_token = False  # ours never adds bos/eos; the data pipeline does
    hf.add_eos_token = False
    return hf


def sentinel_tokens(extra_ids: int) -> list[str]:
    """T5's sentinel names in id order: the ids above the tokenizer's vocabulary, <extra_id_0> last."""
    return [f"<extra_id_{j}>" for j in reversed(range(extra_ids))]


def save_tokenizer(tok: Tokenizer, out_dir: Path, max_len: int | None = None, extra_ids: int = 0) -> None:
    hf = to_hf_tokenizer(tok)
    if extra_ids:
        # appended in order, so <extra_id_j> gets id vocab_size + extra_ids - 1 - j (T5's layout)
        if len(hf) != tok.vocab_size:
            raise UserError(f"tokenizer {tok.name!r}: cannot place {extra_ids} sentinel tokens after its vocabulary")
        hf.add_special_tokens({"additional_special_tokens": sentinel_tokens(extra_ids)})
    if max_len:
        hf.model_max_length = max_len
    hf.save_pretrained(str(out_dir))
    (out_dir / SIDE_FILE).write_text(json.dumps(tok.state()))
