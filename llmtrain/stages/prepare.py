"""data prepare: tokenize data.path once into memory-mapped token shards (see llmtrain.data.prepare).

pretrain does the same implicitly when the cache entry is missing; running it ahead of time
moves the work out of the training job (and lets several jobs share one entry).
"""

from __future__ import annotations

from llmtrain.config.schema import RunConfig
from llmtrain.data.pipeline import run_tokenizer
from llmtrain.data.prepare import prepare
from llmtrain.data.sources import document_reader


def run(cfg: RunConfig) -> None:
    read = document_reader(cfg.data)
    tok = run_tokenizer(cfg, read)
    prepared = prepare(cfg.data, tok, docs=read)
    m = prepared.meta
    if prepared.reused:
        print(
            f"up to date: {prepared.dir} ({m['train']['tokens']:,} train / {m['val']['tokens']:,} val "
            f"tokens, {m['dtype']})",
            flush=True,
        )
