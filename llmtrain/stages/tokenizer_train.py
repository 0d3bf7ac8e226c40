"""tokenizer train: fit a tokenizer on the training split of any data source data.path names (the
split pretrain uses: data.val_fraction, or data.val_path), so the validation text never shapes
the vocabulary. tokenizer=sentencepiece (BPE or unigram), wordpiece or bpe (byte-level; both
Hugging Face `tokenizers`).

Writes <run dir>/tokenizer.model (sentencepiece) or <run dir>/tokenizer.json (wordpiece, bpe), or
tokenizer.path when set, with its settings JSON next to it; use it with
`tokenizer=NAME tokenizer.path=<that file>`.
"""

from __future__ import annotations

from pathlib import Path

from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import read_split
from llmtrain.errors import UserError
from llmtrain.run_records import write_run_files
from llmtrain.runtime import hydra_run_dir
from llmtrain.tokenizers.hf_train import TRAINED, meta_path, train_hf
from llmtrain.tokenizers.train import train_sentencepiece

TRAINABLE = ("sentencepiece", *TRAINED)


def run(cfg: RunConfig) -> None:
    tc = cfg.tokenizer
    if tc.name not in TRAINABLE:
        raise UserError(
            f"tokenizer train trains {', '.join(TRAINABLE)} (tokenizer=NAME); tokenizer.name={tc.name} needs no "
            "training step"
        )
    split = read_split(cfg.data)
    docs = split.train
    run_dir = hydra_run_dir()
    sp = tc.name == "sentencepiece"
    out = Path(tc.path) if tc.path else run_dir / ("tokenizer.model" if sp else "tokenizer.json")
    kind = f"sentencepiece tokenizer ({tc.model_type}, " if sp else f"{tc.name} tokenizer ("
    print(
        f"training {kind}vocab {tc.vocab_size}) on the training split of "
        f"{cfg.data.path}: {len(docs):,} documents, {sum(len(d) for d in docs):,} characters "
        f"({sum(len(d) for d in split.val):,} validation characters left out, split {split.by})",
        flush=True,
    )
    # both validate before writing anything
    tok = train_sentencepiece(docs, tc, out) if sp else train_hf(docs, tc, out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_files(run_dir, cfg)
    # Characters per token on (a sample of) the corpus: how much the tokenizer compresses.
    sample = "".join(docs)[:1_000_000]
    cpt = len(sample) / max(len(tok.encode(sample)), 1)
    side = out.with_suffix(".json") if sp else meta_path(out)
    print(
        f"wrote {out} and {side}: vocab {tok.vocab_size}, {cpt:.2f} characters per token, "
        f"fingerprint {tok.fingerprint()}",
        flush=True,
    )
