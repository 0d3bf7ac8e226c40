"""generate: sample text from a checkpoint (generate.num_samples continuations of generate.prompt, in one batch)."""

from __future__ import annotations

import sys

import numpy as np
import torch

from llmtrain import checkpoints
from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import unk_count, unk_report, unknown_characters
from llmtrain.errors import UserError
from llmtrain.generation import generate
from llmtrain.runtime import setup_runtime


def run(cfg: RunConfig) -> None:
    if not cfg.checkpoint:
        raise UserError("generate needs checkpoint=PATH (a checkpoint or run directory)")
    g = cfg.generate
    if g.num_samples < 1:
        raise UserError(f"generate.num_samples must be >= 1, got {g.num_samples}")
    if g.top_p is not None and not 0.0 < g.top_p <= 1.0:
        raise UserError(f"generate.top_p must be in (0, 1], got {g.top_p}")
    if g.temperature < 0:
        raise UserError(f"generate.temperature must be >= 0, got {g.temperature}")
    rt = setup_runtime(cfg)
    loaded = checkpoints.load(cfg.checkpoint, rt.device)
    enc_dec = getattr(loaded.model, "is_encoder_decoder", False)
    if not getattr(loaded.model, "is_decoder", True) and not enc_dec:
        raise UserError(f"checkpoint {loaded.path} is an encoder ({loaded.model_cfg.name}); generate needs a decoder")
    tok = loaded.tokenizer
    ids = tok.encode(g.prompt) or [tok.bos_id]  # an empty prompt starts from <s>
    report = unk_report(unk_count(np.asarray(ids), tok), len(ids), "generate.prompt")
    if report:  # the model sees <unk> where these characters stand; the echo below hides that
        missing = "".join(unknown_characters(tok, g.prompt))
        print(f"{report} ({missing!r})", file=sys.stderr, flush=True)
    # The prompt as the model read it (U+FFFD where a character became <unk>).
    shown = tok.decode(ids) if report else g.prompt
    if enc_dec:  # the prompt is the encoder's input (with its </s>, as in training); output only
        ids = ids + [tok.eos_id]
    gen = torch.Generator(device=rt.device).manual_seed(cfg.trainer.seed)
    # The samples are rows of one batch: same prompt, independent draws.
    res = generate(
        loaded.model,
        [ids] * g.num_samples,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id or 0,
        generator=gen,
        num_beams=g.num_beams,
        length_penalty=g.length_penalty,
    )
    for i, new in enumerate(res.tokens):
        if g.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(("" if enc_dec else shown) + tok.decode(new), flush=True)
    print(
        f"generate: {res.num_generated} tokens in {res.seconds:.2f}s ({res.tokens_per_second:.1f} tokens/s, "
        f"{g.num_samples} sample{'s' if g.num_samples > 1 else ''}, device {rt.device})",
        file=sys.stderr,
        flush=True,
    )
