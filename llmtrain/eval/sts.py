"""Semantic textual similarity (evaluate's sts task) and the geometry of an embedding space.

- Spearman (and Pearson) correlation between the cosine similarity of the two sentences'
  embeddings and the gold scores (the STS-B protocol of SimCSE and Sentence-BERT).
- alignment and uniformity (Wang & Isola 2020, on L2-normalised embeddings): alignment is the
  mean squared distance between the two sides of positive pairs (gold score >= eval.sts_positive),
  lower is better; uniformity is log E exp(-2 ||x - y||^2) over all pairs of distinct sentences,
  lower (more negative) is better.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmtrain.data.sentences import read_pairs
from llmtrain.errors import UserError
from llmtrain.objectives.contrastive import check_pooling, checkpoint_pooling, embed_texts


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def pearson(x, y) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(x, y).statistic)


def alignment(a: torch.Tensor, b: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||f(x) - f(y)||^alpha over positive pairs (rows of a and b), on normalised vectors."""
    if len(a) == 0:
        return math.nan
    return float((F.normalize(a.double(), dim=-1) - F.normalize(b.double(), dim=-1)).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(-t ||f(x) - f(y)||^2) over all pairs of distinct rows, on normalised vectors."""
    if len(x) < 2:
        return math.nan
    return float(torch.pdist(F.normalize(x.double(), dim=-1), p=2).pow(2).mul(-t).exp().mean().log())


def sts_metrics(a: torch.Tensor, b: torch.Tensor, gold: list[float], positive: float) -> dict[str, float | int]:
    """sts/* metrics for embeddings a[i], b[i] of pair i with gold score gold[i]."""
    cos = cosine_scores(a, b).tolist()
    pos = torch.tensor([g >= positive for g in gold], dtype=torch.bool)
    return {
        "sts/spearman": spearman(cos, gold),
        "sts/pearson": pearson(cos, gold),
        "sts/alignment": alignment(a[pos], b[pos]),
        "sts/uniformity": uniformity(torch.cat([a, b])),
        "sts/n": len(gold),
    }


def sts_eval(ctx) -> tuple[dict[str, float | int], dict]:
    """(metrics, details) of the checkpoint in ctx (llmtrain.eval.suite.EvalContext) on eval.sts_path."""
    e = ctx.cfg.eval
    if not e.sts_path:
        raise UserError("eval task sts needs eval.sts_path=FILE (sentence pairs with gold scores, e.g. STS-B dev.tsv)")
    if len(e.sts_columns) != 3:
        raise UserError(f"eval.sts_columns must name 3 columns (sentence A, B, score), got {list(e.sts_columns)}")
    pairs = read_pairs(e.sts_path, list(e.sts_columns), "eval.sts_path")
    if e.max_examples:
        pairs = pairs[: e.max_examples]
    if len(pairs) < 2:
        raise UserError(f"{e.sts_path}: {len(pairs)} pair(s); a correlation needs at least 2")
    model = ctx.load().backbone
    if getattr(model, "is_decoder", True):
        raise UserError("eval task sts needs an encoder (bert) checkpoint")
    pooling = check_pooling(e.pooling or checkpoint_pooling(ctx.meta), "eval.pooling")

    def embed(texts):
        return embed_texts(model, ctx.tokenizer, texts, pooling, ctx.device, e.batch_size)

    a, b = embed([p.a for p in pairs]), embed([p.b for p in pairs])
    out = sts_metrics(a, b, [p.score for p in pairs], e.sts_positive)
    return out, {"data": e.sts_path, "pooling": pooling, "positive_score": e.sts_positive}
