"""embed: sentence embeddings of an encoder checkpoint, written as one .npy array.

    llmtrain embed checkpoint=RUN_DIR embed.input=sentences.txt embed.out=vectors.npy

Row i of the float32 [N, d_model] array is line i (text file; blank lines too) or record i
(.jsonl/.json/.csv/.tsv, field data.text_field) of embed.input, pooled as the checkpoint was
trained (objective.pooling of a contrastive run, else mean; embed.pooling chooses).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from llmtrain import checkpoints
from llmtrain.config.schema import RunConfig
from llmtrain.data.sentences import read_sentences
from llmtrain.errors import UserError
from llmtrain.files import atomic_write
from llmtrain.objectives.contrastive import check_pooling, checkpoint_pooling, embed_texts
from llmtrain.runtime import setup_runtime


def run(cfg: RunConfig) -> None:
    e = cfg.embed
    if not cfg.checkpoint:
        raise UserError("embed needs checkpoint=PATH (a checkpoint or run directory)")
    if not e.input:
        raise UserError("embed.input is required: the sentences to embed (embed.input=FILE)")
    if not e.out or Path(e.out).suffix != ".npy":
        raise UserError(f"embed.out must name a .npy file to write (got {e.out!r})")
    out = Path(e.out)
    if not out.parent.is_dir():
        raise UserError(f"embed.out: directory not found: {out.parent}")
    if e.pooling is not None:
        check_pooling(e.pooling, "embed.pooling")
    texts = read_sentences(e.input, cfg.data.text_field, cfg.data.encoding_errors, keep_empty=True, what="embed.input")
    rt = setup_runtime(cfg)
    loaded = checkpoints.load(cfg.checkpoint, rt.device)
    model = loaded.backbone
    if getattr(model, "is_decoder", True):
        name = loaded.model_cfg.name
        raise UserError(f"checkpoint {loaded.path} is a decoder ({name}); embed needs an encoder (bert)")
    pooling = e.pooling or checkpoint_pooling(loaded.meta)
    vectors = embed_texts(model, loaded.tokenizer, texts, pooling, rt.device, e.batch_size)
    if e.normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    if rt.is_main:
        buf = io.BytesIO()
        np.save(buf, vectors.numpy().astype(np.float32), allow_pickle=False)
        atomic_write(out, buf.getvalue())
        print(f"embed: {vectors.shape[0]} rows x {vectors.shape[1]} ({pooling} pooling) from {loaded.path} -> {out}")
