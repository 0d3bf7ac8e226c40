"""The data path of a training stage: the tokenizer (built, trained once and cached, or reused)
and the prepared train / validation token splits of data.path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import TokenSplits, split_reader, unk_report
from llmtrain.data.loader import min_train_tokens
from llmtrain.distributed import barrier, is_main
from llmtrain.errors import UserError
from llmtrain.tokenizers import Tokenizer


def load_corpus(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenSplits]:
    """The tokenizer (built or reused) and the train / validation tokens of data.path.

    The splits come from the prepared-data cache (llmtrain.data.prepare) as memory-mapped
    arrays; the corpus is only read when a tokenizer must be trained or the cache prepared.
    Rank 0 does that first; the other ranks then find everything in the cache. With data.sources
    the splits are a mixture's, each source prepared like this (llmtrain.data.mixture).
    """
    from llmtrain.data.prepare import prepare

    if getattr(cfg.data, "sources", None):
        from llmtrain.data.mixture import load_mixture

        return load_mixture(cfg, tokenizer)

    read = split_reader(cfg.data)

    for main_turn in (True, False):
        if is_main() == main_turn:
            tok = tokenizer or run_tokenizer(cfg, lambda: read().train)
            prepared = prepare(cfg.data, tok, split=read, verbose=main_turn)
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


def run_tokenizer(cfg: RunConfig, docs: list[str] | Callable[[], list[str]]) -> Tokenizer:
    """The tokenizer cfg.tokenizer asks for; `docs` (or a function returning them) are the
    training split's documents, only read when one has to be trained (validation text never
    shapes the vocabulary). A sentencepiece model without tokenizer.path is trained once per
    corpus, split and settings into <cache root>/tokenizers/ and reused from there while its
    settings JSON matches; so are wordpiece and bpe (cached_hf_tokenizer)."""
    from llmtrain.data.prepare import cache_root, sha_of, source_fingerprint, split_key
    from llmtrain.tokenizers import build_tokenizer as build
    from llmtrain.tokenizers.sentencepiece import SentencePieceTokenizer
    from llmtrain.tokenizers.train import recorded_settings, train_sentencepiece

    docs_fn = docs if callable(docs) else (lambda: docs)
    tc = cfg.tokenizer
    if tc.name in ("wordpiece", "bpe") and not (tc.path and Path(tc.path).exists()):
        return cached_hf_tokenizer(cfg, docs_fn)
    if tc.name != "sentencepiece" or (tc.path and Path(tc.path).exists()):
        return build(tc, docs_fn)
    if tc.path:
        target = Path(tc.path)
    else:
        # The settings as train_sentencepiece records them in the model's JSON sidecar.
        settings = recorded_settings(tc)
        # The split is part of the key: the tokenizer is trained on the training side only.
        key = sha_of([source_fingerprint(cfg.data), split_key(cfg.data), settings])[:16]
        target = cache_root(cfg.data.cache_dir) / "tokenizers" / f"sp-{tc.model_type}{tc.vocab_size}-{key}.model"
        try:
            recorded = json.loads(target.with_suffix(".json").read_text()).get("settings")
        except (OSError, ValueError):
            recorded = None
        if target.exists() and recorded == settings:
            print(f"using sentencepiece tokenizer {target}", flush=True)
            return SentencePieceTokenizer.load(target)
    train_docs = docs_fn()
    print(
        f"training sentencepiece tokenizer ({tc.model_type}, vocab {tc.vocab_size}) on the training split of "
        f"{cfg.data.path or 'every source'} ({sum(map(len, train_docs)):,} characters) -> {target}",
        flush=True,
    )
    return train_sentencepiece(train_docs, tc, target)


def cached_hf_tokenizer(cfg: RunConfig, docs_fn: Callable[[], list[str]]) -> Tokenizer:
    """tokenizer=wordpiece / bpe (HF `tokenizers`) trained on the training split, cached as
    sentencepiece is: at tokenizer.path when set, else under <cache root>/tokenizers/ keyed by
    the corpus, its split and the settings."""
    from llmtrain.data.prepare import cache_root, sha_of, source_fingerprint, split_key
    from llmtrain.tokenizers.hf_train import TRAINED, hf_settings, meta_path, train_hf

    tc = cfg.tokenizer
    settings = hf_settings(tc)
    if tc.path:
        target = Path(tc.path)
    else:
        key = sha_of([source_fingerprint(cfg.data), split_key(cfg.data), settings])[:16]
        target = cache_root(cfg.data.cache_dir) / "tokenizers" / f"{tc.name}{tc.vocab_size}-{key}.json"
        try:
            recorded = json.loads(meta_path(target).read_text()).get("settings")
        except (OSError, ValueError):
            recorded = None
        if target.exists() and recorded == settings:
            print(f"using {tc.name} tokenizer {target}", flush=True)
            return TRAINED[tc.name].load(target)
    train_docs = docs_fn()
    print(
        f"training {tc.name} tokenizer (vocab {tc.vocab_size}) on the training split of "
        f"{cfg.data.path or 'every source'} ({sum(map(len, train_docs)):,} characters) -> {target}",
        flush=True,
    )
    return train_hf(train_docs, tc, target)
