"""data prepare: tokenize data.path once into memory-mapped token shards (see llmtrain.data.prepare).

pretrain does the same implicitly when the cache entry is missing; running it ahead of time
moves the work out of the training job (and lets several jobs share one entry).
"""

from __future__ import annotations

from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import split_reader, unk_report
from llmtrain.data.pipeline import run_tokenizer
from llmtrain.data.prepare import describe, prepare


def run(cfg: RunConfig) -> None:
    read = split_reader(cfg.data)
    tok = run_tokenizer(cfg, lambda: read().train)  # the tokenizer never sees validation text
    prepared = prepare(cfg.data, tok, split=read)
    m = prepared.meta
    if prepared.reused:
        print(f"up to date: {prepared.dir} ({describe(m)}, {m['dtype']})", flush=True)
    n_unk = m["train"]["unk"] + m["val"]["unk"]
    report = unk_report(n_unk, m["train"]["tokens"] + m["val"]["tokens"], f"data {cfg.data.path}")
    print(report or f"data {cfg.data.path}: no <unk> tokens", flush=True)
