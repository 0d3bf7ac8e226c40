"""The data path of a training stage: the tokenizer (built, trained once and cached, or reused)
and the prepared train / validation token splits of data.path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import TokenSplits, unk_report
from llmtrain.data.loader import min_train_tokens
from llmtrain.distributed import barrier, is_main
from llmtrain.errors import UserError
from llmtrain.tokenizers import Tokenizer


def load_corpus(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenSplits]:
    """The tokenizer (built or reused) and the train / validation tokens of data.path.

    The splits come from the prepared-data cache (llmtrain.data.prepare) as memory-mapped
    shards (an array-like over them); the corpus is only streamed when a tokenizer must be
    trained or the cache prepared.
    Rank 0 does that first; the other ranks then find everything in the cache. With data.sources
    the splits are a mixture's, each source prepared like this (llmtrain.data.mixture).
    """
    from llmtrain.data.prepare import prepare, tokenizer_sample

    if getattr(cfg.data, "sources", None):
        from llmtrain.data.mixture import load_mixture

        return load_mixture(cfg, tokenizer)

    if getattr(cfg.data, "streaming", False):
        return streamed_corpus(cfg, tokenizer)
    for main_turn in (True, False):
        if is_main() == main_turn:
            # A bounded sample of the training split (all of it unless huge); prepare streams the corpus.
            tok = tokenizer or run_tokenizer(cfg, lambda: tokenizer_sample(cfg.data))
            prepared = prepare(cfg.data, tok, verbose=main_turn)
        barrier()
    splits = prepared.splits()
    if is_main():
        if prepared.reused:
            print(f"using prepared data {prepared.dir}", flush=True)
        report = unk_report(splits.unk, len(splits.train) + len(splits.val), f"data {cfg.data.path}")
        if report:
            print(report, flush=True)
    need = min_train_tokens(cfg.data.seq_len)
    if len(splits.train) < need:
        raise UserError(
            f"data {cfg.data.path}: {len(splits.train)} training tokens are too few for data.seq_len="
            f"{cfg.data.seq_len}, which needs at least {need} (2 * seq_len + 1; use a smaller data.seq_len)"
        )
    return tok, splits


def streamed_corpus(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenSplits]:
    """data.streaming=true: the training split is a TokenStream over data.path (llmtrain.data.streaming),
    validation data.val_path tokenized whole (or none); a tokenizer is trained on the stream's start."""
    import numpy as np

    from llmtrain.data.corpus import split_tokens, token_dtype
    from llmtrain.data.prepare import TOKENIZER_SAMPLE_CHARS
    from llmtrain.data.sources import iter_pieces, read_documents
    from llmtrain.data.streaming import TokenStream

    d = cfg.data
    if cfg.objective.name != "clm" or cfg.stage != "pretrain":
        raise UserError(
            f"data.streaming=true supports pretrain with objective=clm (got {cfg.stage} with {cfg.objective.name}); "
            "use data.streaming=false (prepared shards)"
        )
    if not d.path:
        raise UserError("data.path is not set (e.g. data=text data.path=FILE)")

    def head() -> list[str]:  # the stream's first TOKENIZER_SAMPLE_CHARS characters
        docs, cur, n = [], [], 0
        for piece, ends in iter_pieces(d.path, d.text_field, d.encoding_errors, d.doc_pattern):
            cur.append(piece)
            n += len(piece)
            if ends or n >= TOKENIZER_SAMPLE_CHARS:
                docs.append("".join(cur))
                cur = []
            if n >= TOKENIZER_SAMPLE_CHARS:
                break
        return docs + (["".join(cur)] if cur else [])

    tok = tokenizer or run_tokenizer(cfg, head)
    if d.val_path:
        docs = read_documents(d.val_path, d.text_field, d.encoding_errors, d.doc_pattern, "data.val_path")
        val_tokens = split_tokens(docs, tok, 0.0).train  # all of it: the validation side
        val_bytes = sum(len(x.encode("utf-8")) for x in docs)
    else:
        val_tokens, val_bytes = np.zeros(0, dtype=token_dtype(tok.vocab_size)), 0
    if is_main():
        print(
            f"streaming {d.path}: tokenized on the fly (data.streaming=true), validation "
            f"{d.val_path or 'none (set data.val_path)'}",
            flush=True,
        )
    return tok, TokenSplits(train=TokenStream(d, tok), val=val_tokens, n_docs=0, val_bytes=val_bytes, by="streaming")


def run_tokenizer(cfg: RunConfig, docs: list[str] | Callable[[], list[str]]) -> Tokenizer:
    """The tokenizer cfg.tokenizer asks for; `docs` (or a function returning them) are the
    training split's documents, only read when one has to be trained (validation text never
    shapes the vocabulary). A sentencepiece model without tokenizer.path is trained once per
    corpus, split and settings into <cache root>/tokenizers/ and reused from there while its
    settings JSON matches; so are wordpiece and bpe (cached_hf_tokenizer)."""
    from llmtrain.tokenizers import build_tokenizer as build
    from llmtrain.tokenizers.sentencepiece import SentencePieceTokenizer
    from llmtrain.tokenizers.train import recorded_settings, train_sentencepiece

    docs_fn = docs if callable(docs) else (lambda: docs)
    tc = cfg.tokenizer
    if tc.name in ("wordpiece", "bpe") and not (tc.path and Path(tc.path).exists()):
        return cached_hf_tokenizer(cfg, docs_fn)
    if tc.name != "sentencepiece" or (tc.path and Path(tc.path).exists()):
        return build(tc, docs_fn)
    # The settings as train_sentencepiece records them in the model's JSON sidecar.
    return _trained_once(
        cfg,
        docs_fn,
        recorded_settings(tc),
        lambda key: f"sp-{tc.model_type}{tc.vocab_size}-{key}.model",
        lambda target: target.with_suffix(".json"),
        SentencePieceTokenizer.load,
        lambda docs, target: train_sentencepiece(docs, tc, target),
        "sentencepiece",
        f"{tc.model_type}, vocab {tc.vocab_size}",
    )


def cached_hf_tokenizer(cfg: RunConfig, docs_fn: Callable[[], list[str]]) -> Tokenizer:
    """tokenizer=wordpiece / bpe (HF `tokenizers`) trained on the training split, cached as
    sentencepiece is: at tokenizer.path when set, else under <cache root>/tokenizers/ keyed by
    the corpus, its split and the settings."""
    from llmtrain.tokenizers.hf_train import TRAINED, hf_settings, meta_path, train_hf

    tc = cfg.tokenizer
    return _trained_once(
        cfg,
        docs_fn,
        hf_settings(tc),
        lambda key: f"{tc.name}{tc.vocab_size}-{key}.json",
        meta_path,
        TRAINED[tc.name].load,
        lambda docs, target: train_hf(docs, tc, target),
        tc.name,
        f"vocab {tc.vocab_size}",
    )


def _trained_once(
    cfg: RunConfig,
    docs_fn: Callable[[], list[str]],
    settings: object,
    filename: Callable[[str], str],
    sidecar: Callable[[Path], Path],
    load: Callable[[Path], Tokenizer],
    train: Callable[[list[str], Path], Tokenizer],
    what: str,
    shape: str,
) -> Tokenizer:
    """A tokenizer trained on the training split: at tokenizer.path when set, else under
    <cache root>/tokenizers/ keyed by the corpus, its split and the settings, and reused from
    there while its JSON sidecar records the same settings (every trained kind caches alike)."""
    from llmtrain.data.prepare import cache_root, sha_of, source_fingerprint, split_key

    tc = cfg.tokenizer
    if tc.path:
        target = Path(tc.path)
    else:
        # The split is part of the key: the tokenizer is trained on the training side only.
        key = sha_of([source_fingerprint(cfg.data), split_key(cfg.data), settings])[:16]
        target = cache_root(cfg.data.cache_dir) / "tokenizers" / filename(key)
        try:
            recorded = json.loads(sidecar(target).read_text()).get("settings")
        except (OSError, ValueError):
            recorded = None
        if target.exists() and recorded == settings:
            print(f"using {what} tokenizer {target}", flush=True)
            return load(target)
    train_docs = docs_fn()
    print(
        f"training {what} tokenizer ({shape}) on the training split of "
        f"{cfg.data.path or 'every source'} ({sum(map(len, train_docs)):,} characters) -> {target}",
        flush=True,
    )
    return train(train_docs, target)
