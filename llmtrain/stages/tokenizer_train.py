"""tokenizer train: fit a SentencePiece model (BPE or unigram) on the training split of any data
source data.path names (the split pretrain uses: data.val_fraction, or data.val_path), so the
validation text never shapes the vocabulary.

Writes <run dir>/tokenizer.model (or tokenizer.path when set) and its settings JSON next to it;
use it with `tokenizer=sentencepiece tokenizer.path=<that file>`.
"""

from __future__ import annotations

from pathlib import Path

from llmtrain.config.schema import RunConfig
from llmtrain.data.prepare import plan_split, tokenizer_sample
from llmtrain.errors import UserError
from llmtrain.run_records import write_run_files
from llmtrain.runtime import hydra_run_dir
from llmtrain.tokenizers.train import train_sentencepiece


def run(cfg: RunConfig) -> None:
    tc = cfg.tokenizer
    if tc.name != "sentencepiece":
        raise UserError(
            f"tokenizer train trains sentencepiece models (tokenizer=sentencepiece); "
            f"tokenizer.name={tc.name} needs no training step"
        )
    # The training split (a bounded, evenly spread sample of it on a huge corpus), streamed.
    docs = tokenizer_sample(cfg.data)
    plan = plan_split(cfg.data)
    run_dir = hydra_run_dir()
    out = Path(tc.path) if tc.path else run_dir / "tokenizer.model"
    print(
        f"training sentencepiece tokenizer ({tc.model_type}, vocab {tc.vocab_size}) on the training split of "
        f"{cfg.data.path}: {len(docs):,} documents, {sum(len(d) for d in docs):,} characters "
        f"({plan.chars - plan.train_chars:,} validation characters left out, split {plan.by})",
        flush=True,
    )
    tok = train_sentencepiece(docs, tc, out)  # validates before writing anything
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_files(run_dir, cfg)
    # Characters per token on (a sample of) the corpus: how much the tokenizer compresses.
    sample = "".join(docs)[:1_000_000]
    cpt = len(sample) / max(len(tok.encode(sample)), 1)
    print(
        f"wrote {out} and {out.with_suffix('.json')}: vocab {tok.vocab_size}, "
        f"{cpt:.2f} characters per token, fingerprint {tok.fingerprint()}",
        flush=True,
    )
