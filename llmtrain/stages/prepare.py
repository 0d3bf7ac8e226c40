"""data prepare: tokenize data.path once into memory-mapped token shards (see llmtrain.data.prepare),
streaming the corpus in data.num_proc processes; an interrupted prepare resumes at its last shard.

pretrain does the same implicitly when the cache entry is missing; running it ahead of time
moves the work out of the training job (and lets several jobs share one entry).
"""

from __future__ import annotations

from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import unk_report
from llmtrain.data.pipeline import run_tokenizer
from llmtrain.data.prepare import describe, prepare, tokenizer_sample


def run(cfg: RunConfig) -> None:
    # The tokenizer never sees validation text; the corpus is streamed (memory stays bounded).
    tok = run_tokenizer(cfg, lambda: tokenizer_sample(cfg.data))
    prepared = prepare(cfg.data, tok)
    m = prepared.meta
    if prepared.reused:
        print(f"up to date: {prepared.dir} ({describe(m)}, {m['dtype']})", flush=True)
    n_unk = m["train"]["unk"] + m["val"]["unk"]
    report = unk_report(n_unk, m["train"]["tokens"] + m["val"]["tokens"], f"data {cfg.data.path}")
    print(report or f"data {cfg.data.path}: no <unk> tokens", flush=True)
