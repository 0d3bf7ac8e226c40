"""Tests for llmtrain.eval.metrics: reference implementations and hand-computed cases."""

from __future__ import annotations

import math
import random
import statistics
import sys

import pytest

from llmtrain.eval import metrics as M

# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


def test_classification_hand_computed_confusion_matrix():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 0, 2]
    out = M.classification_metrics(preds, labels, label_names=["a", "b", "c"])
    # rows = true, cols = predicted
    # true 0 -> predicted 0, 1 ; true 1 -> 1, 1 ; true 2 -> 0, 2
    assert out["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert out["labels"] == ["a", "b", "c"]
    assert out["n"] == 6
    assert out["accuracy"] == pytest.approx(4 / 6)
    pc = out["per_class"]
    # a: tp=1, predicted 2x, support 2 -> P=1/2 R=1/2 F=1/2
    assert pc["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # b: tp=2, predicted 3x, support 2 -> P=2/3 R=1 F=2*(2/3)/(5/3)=0.8
    assert pc["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    # c: tp=1, predicted 1x, support 2 -> P=1 R=1/2 F=2/3
    assert pc["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_classification_class_never_predicted_has_zero_precision():
    labels = [0, 1, 2, 2]
    preds = [0, 1, 1, 1]  # class 2 is never predicted
    out = M.classification_metrics(preds, labels)
    c2 = out["per_class"]["2"]
    assert c2 == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # class 1: tp=1, predicted 3x, support 1 -> P=1/3 R=1 F=0.5
    assert out["per_class"]["1"]["f1"] == pytest.approx(0.5)
    assert out["macro_f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert out["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 2, 0]]


def test_classification_named_class_absent_everywhere_not_in_macro():
    out = M.classification_metrics([0, 2, 2], [0, 2, 2], label_names=["neg", "neu", "pos"])
    assert out["accuracy"] == 1.0
    assert out["macro_f1"] == 1.0  # "neu" occurs nowhere, so it is not averaged in
    assert out["per_class"]["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert out["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 0, 2]]


def test_classification_string_labels_and_numpy_input():
    np = pytest.importorskip("numpy")
    out = M.classification_metrics(["cat", "dog", "dog"], ["cat", "cat", "dog"])
    assert out["labels"] == ["cat", "dog"]
    assert out["confusion_matrix"] == [[1, 1], [0, 1]]
    out_np = M.classification_metrics(np.array([1, 0, 1]), np.array([1, 1, 1]), label_names=["x", "y"])
    assert out_np["confusion_matrix"] == [[0, 0], [1, 2]]
    assert out_np["accuracy"] == pytest.approx(2 / 3)


def test_classification_errors():
    with pytest.raises(ValueError, match="length"):
        M.classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        M.classification_metrics([], [])
    with pytest.raises(ValueError, match="outside"):
        M.classification_metrics([0, 3], [0, 1], label_names=["a", "b"])


def test_classification_matches_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    labels = [rng.randrange(5) for _ in range(300)]
    preds = [rng.choice([0, 1, 2, 3]) if rng.random() < 0.5 else y for y in labels]  # 4 sometimes missing
    out = M.classification_metrics(preds, labels)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert out["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro", zero_division=0))
    assert out["confusion_matrix"] == skm.confusion_matrix(labels, preds).tolist()
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, zero_division=0)
    for i, name in enumerate(out["labels"]):
        pc = out["per_class"][name]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))


# --------------------------------------------------------------------------------------
# SQuAD
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The  Cat, sat!", "cat sat"),
        ("an apple a day", "apple day"),
        ("Theatre", "theatre"),  # articles only at word boundaries
        ("  ", ""),
        ("The", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert M.normalize_answer(raw) == expected


def test_squad_f1_hand_computed():
    # "the cat sat" -> tokens [cat, sat]; "a cat sat on" -> [cat, sat, on]
    # common = {cat, sat} = 2 ; P = 2/2 = 1 ; R = 2/3 ; F1 = 2*1*(2/3)/(1+2/3) = 0.8
    assert M.squad_f1("the cat sat", ["a cat sat on"]) == pytest.approx(0.8)
    assert M.squad_exact("the cat sat", ["a cat sat on"]) == 0.0
    # exact after normalisation (case, punctuation, article)
    assert M.squad_exact("The cat sat.", ["cat sat"]) == 1.0


def test_squad_max_over_golds_and_repeated_tokens():
    assert M.squad_f1("cat sat", ["dog", "a cat sat on", "cat sat"]) == 1.0
    assert M.squad_exact("dog", ["cat", "Dog!"]) == 1.0
    # Counter intersection: pred [cat, cat] vs gold [cat] -> common 1, P=1/2, R=1, F1=2/3
    assert M.squad_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)


def test_squad_no_answer_handling():
    for golds in ([""], [], ["the"]):  # all normalise to no answer
        assert M.squad_exact("", golds) == 1.0
        assert M.squad_f1("", golds) == 1.0
        assert M.squad_exact("paris", golds) == 0.0
        assert M.squad_f1("paris", golds) == 0.0
    # empty prediction on an answerable question scores 0
    assert M.squad_f1("", ["paris"]) == 0.0
    assert M.squad_exact("", ["paris"]) == 0.0
    # an empty gold next to a real one is dropped (official v2 behaviour)
    assert M.squad_exact("", ["", "paris"]) == 0.0


def test_squad_metrics_has_ans_no_ans_breakdown():
    references = {
        "q1": ["Paris"],  # answerable, exact          -> EM 1, F1 1
        "q2": ["a cat sat on"],  # answerable, partial -> EM 0, F1 0.8 (see above)
        "q3": [""],  # unanswerable, abstains          -> EM 1, F1 1
        "q4": [""],  # unanswerable, answers anyway    -> EM 0, F1 0
    }
    predictions = {"q1": "paris", "q2": "the cat sat", "q3": "", "q4": "london", "extra": "ignored"}
    out = M.squad_metrics(predictions, references)
    assert out["total"] == 4
    assert out["exact"] == pytest.approx(100 * (1 + 0 + 1 + 0) / 4)
    assert out["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    assert out["HasAns_total"] == 2
    assert out["HasAns_exact"] == pytest.approx(100 * (1 + 0) / 2)
    assert out["HasAns_f1"] == pytest.approx(100 * (1 + 0.8) / 2)
    assert out["NoAns_total"] == 2
    assert out["NoAns_exact"] == pytest.approx(100 * (1 + 0) / 2)
    assert out["NoAns_f1"] == pytest.approx(100 * (1 + 0) / 2)
    assert out["missing"] == 0


def test_squad_metrics_v1_style_and_missing_predictions():
    references = {"q1": ["Paris", "paris france"], "q2": ["blue"]}
    out = M.squad_metrics({"q1": "Paris, France"}, references)
    # q1 exact vs 2nd gold; q2 missing -> 0
    assert out["total"] == 2 and out["missing"] == 1
    assert out["exact"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(50.0)
    assert out["HasAns_total"] == 2
    assert not any(k.startswith("NoAns") for k in out)  # official script omits empty groups
    with pytest.raises(ValueError):
        M.squad_metrics({}, {})


# --------------------------------------------------------------------------------------
# BLEU / ROUGE / exact match
# --------------------------------------------------------------------------------------

HYPS = [
    "the cat is on the mat",
    "there is a dog in the garden today",
    "it rained heavily in the morning",
]
REFS = [
    "the cat sat on the mat",
    "a dog is in the garden",
    "heavy rain fell during the morning",
]
REFS2 = [
    "there is a cat on the mat",
    "there is a dog in the garden",
    "it rained a lot this morning",
]


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    assert M.bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    # per-example multi-reference layout is transposed into sacrebleu's streams
    per_example = [[a, b] for a, b in zip(REFS, REFS2)]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score
    assert M.bleu(HYPS, per_example) == pytest.approx(expected)
    assert expected > sacrebleu.corpus_bleu(HYPS, [REFS]).score  # sanity: 2nd ref helps
    # variable number of references per example: padded with None
    ragged = [[REFS[0], REFS2[0]], [REFS[1]], [REFS[2], REFS2[2]]]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS, [REFS2[0], None, REFS2[2]]]).score
    assert M.bleu(HYPS, ragged) == pytest.approx(expected)


def test_bleu_hand_checkable():
    pytest.importorskip("sacrebleu")
    assert M.bleu(HYPS, HYPS) == pytest.approx(100.0)
    assert M.bleu(["alpha beta gamma delta"], ["one two three four"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="length"):
        M.bleu(HYPS, REFS[:2])


def test_rouge_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = M.rouge(HYPS, REFS)
    assert set(out) == {"rouge1", "rouge2", "rougeL"}
    for t in out:
        expected = statistics.fmean(scorer.score(r, h)[t].fmeasure for h, r in zip(HYPS, REFS))
        assert out[t] == pytest.approx(expected)
    per_example = [[a, b] for a, b in zip(REFS, REFS2)]
    out_multi = M.rouge(HYPS, per_example)
    for t in out_multi:
        expected = statistics.fmean(scorer.score_multi(r, h)[t].fmeasure for h, r in zip(HYPS, per_example))
        assert out_multi[t] == pytest.approx(expected)


def test_rouge_identical_and_stemming():
    pytest.importorskip("rouge_score")
    assert M.rouge(HYPS, HYPS) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # Porter stemmer: "cats running" == "cat run" after stemming
    assert M.rouge(["cats running"], ["cat run"])["rouge1"] == pytest.approx(1.0)
    assert M.rouge(["alpha beta"], ["gamma delta"])["rougeL"] == 0.0


def test_missing_optional_dependency_messages(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` raise ImportError
    with pytest.raises(ImportError, match=r"llmtrain\[metrics\]"):
        M.bleu(["a"], ["a"])
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ImportError, match=r"llmtrain\[metrics\]"):
        M.rouge(["a"], ["a"])


def test_exact_match():
    assert M.exact_match(["a b", " c ", "d"], ["a b", "c", "e"]) == pytest.approx(2 / 3)
    assert M.exact_match(["x", "y"], [["q", "x"], ["z"]]) == pytest.approx(1 / 2)
    assert M.exact_match(["The Cat."], ["cat"]) == 0.0
    assert M.exact_match(["The Cat."], ["cat"], normalize=True) == 1.0
    with pytest.raises(ValueError):
        M.exact_match([], [])


# --------------------------------------------------------------------------------------
# Language modelling
# --------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_mean_token_loss():
    token_losses = [0.5, 1.25, 2.0, 0.125, 3.5, 0.75]
    expected = math.exp(statistics.fmean(token_losses))
    assert M.perplexity(math.fsum(token_losses), len(token_losses)) == pytest.approx(expected)


def test_perplexity_uniform_model_equals_vocab_size():
    vocab, n = 50_257, 1000
    assert M.perplexity(n * math.log(vocab), n) == pytest.approx(vocab)
    assert M.perplexity(0.0, 5) == 1.0
    assert M.perplexity(1e6, 1) == math.inf  # no OverflowError


def test_bits_per_byte_known_cases():
    text = "héllo wörld"  # 2 two-byte chars -> 13 UTF-8 bytes for 11 characters
    n_bytes = M.utf8_num_bytes(text)
    assert n_bytes == len(text) + 2 == len(text.encode("utf-8"))
    # a model uniform over 256 byte values costs ln(256) nats = 8 bits per byte
    assert M.bits_per_byte(n_bytes * math.log(256), n_bytes) == pytest.approx(8.0)
    # one bit (ln 2 nats) per byte -> 1.0
    assert M.bits_per_byte(n_bytes * math.log(2), n_bytes) == pytest.approx(1.0)
    assert M.utf8_num_bytes(["ab", "é"]) == 4


def test_lm_metric_errors():
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)
    with pytest.raises(ValueError):
        M.perplexity(-1.0, 3)
    with pytest.raises(ValueError):
        M.perplexity(float("nan"), 3)
    with pytest.raises(ValueError):
        M.bits_per_byte(1.0, 0)
