"""Pure evaluation metrics: classification, SQuAD v1/v2, BLEU/ROUGE, LM perplexity and bits-per-byte.

Nothing here needs torch. ``sacrebleu`` and ``rouge_score`` are optional dependencies
(``pip install 'llmtrain[metrics]'``) and are imported lazily inside :func:`bleu` and
:func:`rouge` only.

Conventions:
- Classification / ROUGE / exact-match scores are fractions in [0, 1].
- BLEU is in [0, 100] (sacrebleu's convention).
- SQuAD scores are percentages in [0, 100], exactly like the official v2.0 evaluation script.
- Empty inputs and length mismatches raise ``ValueError`` instead of returning a made-up number.
"""

from __future__ import annotations

import collections
import math
import operator
import re
import string
from typing import Any, Hashable, Iterable, Mapping, Sequence

__all__ = [
    "classification_metrics",
    "normalize_answer",
    "squad_exact",
    "squad_f1",
    "squad_metrics",
    "bleu",
    "rouge",
    "exact_match",
    "perplexity",
    "bits_per_byte",
    "utf8_num_bytes",
]

_METRICS_EXTRA = "pip install 'llmtrain[metrics]'"


def _as_list(x: Any, what: str) -> list:
    """Materialise a sequence / numpy array / torch tensor as a plain Python list."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of items, not a single {type(x).__name__}")
    if hasattr(x, "tolist"):  # numpy arrays and torch tensors -> python scalars
        x = x.tolist()
    return list(x)


def _check_same_length(a: Sequence, b: Sequence, a_name: str, b_name: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} and {b_name} differ in length ({len(a)} vs {len(b)})")
    if len(a) == 0:
        raise ValueError(f"{a_name} and {b_name} are empty; metric is undefined")


def _is_index(v: Any, n: int) -> bool:
    if isinstance(v, bool):
        return False
    try:
        return 0 <= operator.index(v) < n  # ints, numpy ints
    except TypeError:
        return False


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


def classification_metrics(
    preds: Sequence[Hashable],
    labels: Sequence[Hashable],
    label_names: Sequence[str] | None = None,
) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``preds`` and ``labels`` are equal-length sequences of class ids (ints, strings, ...;
    numpy arrays / torch tensors are accepted).

    Class set and order:
    - with ``label_names``: labels must be ints in ``range(len(label_names))`` and class ``i``
      is named ``label_names[i]``; every named class appears in the output, even if absent
      from both ``preds`` and ``labels``.
    - without: the classes are ``sorted(set(labels) | set(preds))`` named ``str(class)``.

    Classes never predicted get precision 0 (no division error); classes with no true
    examples get recall 0. ``macro_f1`` is the unweighted mean F1 over the classes that occur
    in ``labels`` or ``preds`` (scikit-learn's ``f1_score(average="macro")`` default), so a
    named class that never occurs anywhere does not drag the average down.

    Returns a dict with keys ``accuracy``, ``macro_f1``, ``n``, ``labels`` (class names in
    matrix order), ``per_class`` (name -> {precision, recall, f1, support}) and
    ``confusion_matrix`` (list of lists; rows = true class, columns = predicted class).
    """
    preds = _as_list(preds, "preds")
    labels = _as_list(labels, "labels")
    _check_same_length(preds, labels, "preds", "labels")

    if label_names is not None:
        names = [str(n) for n in label_names]
        if not names:
            raise ValueError("label_names is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"label_names contains duplicates: {names}")
        classes: list = list(range(len(names)))
        for what, seq in (("preds", preds), ("labels", labels)):
            bad = sorted({v for v in seq if not _is_index(v, len(names))}, key=repr)
            if bad:
                raise ValueError(
                    f"{what} contains values {bad[:5]} outside 0..{len(names) - 1} "
                    f"(label_names has {len(names)} entries)"
                )
    else:
        present = set(labels) | set(preds)
        try:
            classes = sorted(present)
        except TypeError:  # mixed, unorderable types: fall back to a deterministic order
            classes = sorted(present, key=repr)
        names = [str(c) for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"distinct classes share a string name: {classes}")

    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    cm = [[0] * k for _ in range(k)]
    for p, t in zip(preds, labels):
        cm[index[t]][index[p]] += 1

    per_class: dict[str, dict[str, float | int]] = {}
    f1s_for_macro: list[float] = []
    for i, name in enumerate(names):
        tp = cm[i][i]
        support = sum(cm[i])  # true examples of class i
        predicted = sum(cm[r][i] for r in range(k))  # times class i was predicted
        precision = _safe_div(tp, predicted)
        recall = _safe_div(tp, support)
        f1 = _safe_div(2 * precision * recall, precision + recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted:
            f1s_for_macro.append(f1)

    correct = sum(cm[i][i] for i in range(k))
    return {
        "accuracy": correct / len(labels),
        "macro_f1": sum(f1s_for_macro) / len(f1s_for_macro),
        "n": len(labels),
        "labels": names,
        "per_class": per_class,
        "confusion_matrix": cm,
    }


# --------------------------------------------------------------------------------------
# SQuAD v1.1 / v2.0 (mirrors the official evaluate-v2.0.py)
# --------------------------------------------------------------------------------------

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Official SQuAD normalisation: lowercase, drop punctuation, drop articles, squash whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def _get_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def _exact_single(pred: str, gold: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def _f1_single(pred: str, gold: str) -> float:
    gold_toks = _get_tokens(gold)
    pred_toks = _get_tokens(pred)
    if not gold_toks or not pred_toks:
        # No-answer: F1 is 1 iff both are empty, else 0.
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _clean_golds(golds: str | Iterable[str]) -> list[str]:
    """Like the official v2 script: drop golds that normalise to ''; none left -> [''] (unanswerable)."""
    if isinstance(golds, str):
        golds = [golds]
    kept = [g for g in golds if normalize_answer(g)]
    return kept or [""]


def squad_exact(pred: str, golds: str | Sequence[str]) -> float:
    """Max over gold answers of normalised exact match (0.0 or 1.0).

    ``golds == [""]`` (or ``[]``) marks an unanswerable question; predicting ``""`` then scores 1.
    """
    return float(max(_exact_single(pred, g) for g in _clean_golds(golds)))


def squad_f1(pred: str, golds: str | Sequence[str]) -> float:
    """Max over gold answers of the SQuAD bag-of-tokens F1 in [0, 1]."""
    return max(_f1_single(pred, g) for g in _clean_golds(golds))


def squad_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
) -> dict:
    """Corpus SQuAD scores, in percent, keyed like the official v2.0 evaluation script.

    ``references`` maps question id -> list of gold answer texts (``[""]`` or ``[]`` for an
    unanswerable question). ``predictions`` maps question id -> predicted text (``""`` means
    "no answer").

    Returns ``exact``, ``f1``, ``total`` plus, when such questions exist, ``HasAns_exact``,
    ``HasAns_f1``, ``HasAns_total`` and ``NoAns_exact``, ``NoAns_f1``, ``NoAns_total``
    (the official script omits a group that is empty; so do we).

    Every reference question counts in ``total``; a question with no prediction scores 0 (as in
    the official v1.1 script) and is counted in ``missing``. Predictions for ids not in
    ``references`` are ignored.
    """
    if not references:
        raise ValueError("squad_metrics: references is empty; metric is undefined")

    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_ans: list[str] = []
    no_ans: list[str] = []
    missing = 0
    for qid, golds in references.items():
        cleaned = _clean_golds(golds)
        (has_ans if cleaned != [""] else no_ans).append(qid)
        if qid not in predictions:
            missing += 1
            exact[qid] = 0.0
            f1[qid] = 0.0
            continue
        pred = predictions[qid]
        if pred is None:
            pred = ""
        exact[qid] = squad_exact(pred, cleaned)
        f1[qid] = squad_f1(pred, cleaned)

    def _agg(qids: Sequence[str]) -> tuple[float, float, int]:
        n = len(qids)
        return (
            100.0 * sum(exact[q] for q in qids) / n,
            100.0 * sum(f1[q] for q in qids) / n,
            n,
        )

    out: dict[str, float | int] = {}
    out["exact"], out["f1"], out["total"] = _agg(list(references))
    if has_ans:
        out["HasAns_exact"], out["HasAns_f1"], out["HasAns_total"] = _agg(has_ans)
    if no_ans:
        out["NoAns_exact"], out["NoAns_f1"], out["NoAns_total"] = _agg(no_ans)
    out["missing"] = missing
    return out


# --------------------------------------------------------------------------------------
# Generation: BLEU / ROUGE / exact match
# --------------------------------------------------------------------------------------


def _per_example_refs(references: Sequence[str] | Sequence[Sequence[str]], n: int) -> list[list[str]]:
    """Normalise references to one non-empty list of reference strings per hypothesis."""
    refs = _as_list(references, "references")
    if len(refs) != n:
        raise ValueError(f"hypotheses and references differ in length ({n} vs {len(refs)})")
    out: list[list[str]] = []
    for i, r in enumerate(refs):
        if isinstance(r, str):
            out.append([r])
        else:
            r = list(r)
            if not r or not all(isinstance(x, str) for x in r):
                raise ValueError(f"references[{i}] must be a string or a non-empty list of strings")
            out.append(r)
    return out


def bleu(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> float:
    """Corpus BLEU (0-100) via ``sacrebleu.corpus_bleu``.

    ``references[i]`` is the reference for ``hypotheses[i]``: either one string or a list of
    alternative reference strings (the count may vary between examples). Note this is
    per-example layout, *not* sacrebleu's per-stream layout; we transpose for you.
    """
    try:
        import sacrebleu
    except ImportError:  # pragma: no cover - exercised only without the extra installed
        raise ImportError(f"bleu() needs the 'sacrebleu' package: {_METRICS_EXTRA}") from None

    hyps = _as_list(hypotheses, "hypotheses")
    if not hyps:
        raise ValueError("hypotheses is empty; BLEU is undefined")
    per_ex = _per_example_refs(references, len(hyps))
    n_streams = max(len(r) for r in per_ex)
    # sacrebleu wants streams: streams[k][i] = k-th reference of example i; None pads variable counts.
    streams = [[r[k] if k < len(r) else None for r in per_ex] for k in range(n_streams)]
    result = sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize, lowercase=lowercase)
    return float(result.score)


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (0-1) via ``rouge_score`` with the Porter stemmer.

    With several references for one example, the best-F reference is used per ROUGE type
    (``RougeScorer.score_multi``). Note: rouge_score's default tokenizer keeps only ASCII
    letters/digits, so non-Latin-script text scores 0.
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError:  # pragma: no cover - exercised only without the extra installed
        raise ImportError(f"rouge() needs the 'rouge-score' package: {_METRICS_EXTRA}") from None

    hyps = _as_list(hypotheses, "hypotheses")
    if not hyps:
        raise ValueError("hypotheses is empty; ROUGE is undefined")
    per_ex = _per_example_refs(references, len(hyps))
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for hyp, refs in zip(hyps, per_ex):
        scores = scorer.score(refs[0], hyp) if len(refs) == 1 else scorer.score_multi(refs, hyp)
        for t in _ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    return {t: totals[t] / len(hyps) for t in _ROUGE_TYPES}


def exact_match(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    normalize: bool = False,
) -> float:
    """Fraction (0-1) of hypotheses equal to (any of) their reference(s).

    Comparison is on whitespace-stripped strings; with ``normalize=True`` it uses
    :func:`normalize_answer` (case/punctuation/article-insensitive) instead.
    """
    hyps = _as_list(hypotheses, "hypotheses")
    if not hyps:
        raise ValueError("hypotheses is empty; exact match is undefined")
    per_ex = _per_example_refs(references, len(hyps))
    norm = normalize_answer if normalize else str.strip
    hits = sum(any(norm(h) == norm(r) for r in refs) for h, refs in zip(hyps, per_ex))
    return hits / len(hyps)


# --------------------------------------------------------------------------------------
# Language modelling
# --------------------------------------------------------------------------------------


def _check_nll(total_nll_nats: float) -> float:
    total = float(total_nll_nats)  # accepts python/numpy/torch scalars
    if math.isnan(total) or total < 0:
        raise ValueError(f"total_nll_nats must be a non-negative number, got {total}")
    return total


def _check_count(n: int, what: str) -> int:
    if isinstance(n, bool) or int(n) != n or n <= 0:
        raise ValueError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def perplexity(total_nll_nats: float, n_tokens: int) -> float:
    """exp(total NLL / n_tokens), the NLL summed in nats over ``n_tokens`` predicted tokens.

    Returns ``inf`` instead of raising ``OverflowError`` for very large losses.
    """
    total = _check_nll(total_nll_nats)
    n = _check_count(n_tokens, "n_tokens")
    try:
        return math.exp(total / n)
    except OverflowError:
        return math.inf


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Total NLL (nats) / (ln 2 * number of UTF-8 bytes of the scored text).

    Unlike perplexity this does not depend on the tokenizer, so models with different
    vocabularies can be compared. Use :func:`utf8_num_bytes` to count ``n_bytes``.
    """
    total = _check_nll(total_nll_nats)
    n = _check_count(n_bytes, "n_bytes")
    return total / (math.log(2) * n)


def utf8_num_bytes(texts: str | Iterable[str]) -> int:
    """Number of UTF-8 bytes in one string or summed over an iterable of strings."""
    if isinstance(texts, str):
        texts = [texts]
    return sum(len(t.encode("utf-8")) for t in texts)
