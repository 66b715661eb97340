"""Tests for peftlab.data.metrics against hand-computed values."""

import pytest

from peftlab.data.metrics import (
    bleu_metrics,
    classification_metrics,
    exact_match,
    generation_metrics,
    metric_fn,
    per_example_rouge1,
    rouge_metrics,
)

PRED = "It is cold outside"
REF = "It is very cold outside"
# rouge1: P = 4/4, R = 4/5 -> F = 2 * 1 * 0.8 / 1.8
ROUGE1_F = 2 * 1.0 * 0.8 / 1.8
# rouge2: pred bigrams {it is, is cold, cold outside}, ref {it is, is very, very cold, cold outside}
# overlap 2 -> P = 2/3, R = 2/4 -> F = 2PR / (P + R)
ROUGE2_F = 2 * (2 / 3) * (2 / 4) / ((2 / 3) + (2 / 4))


def test_rouge_textbook_example():
    m = rouge_metrics([PRED], [[REF]])
    assert m["rouge1"] == pytest.approx(ROUGE1_F)
    assert m["rouge1"] == pytest.approx(0.888888, abs=1e-5)
    assert m["rouge2"] == pytest.approx(ROUGE2_F)
    assert m["rouge2"] == pytest.approx(0.571428, abs=1e-5)
    # LCS = "it is cold outside" (4 tokens), same as rouge1
    assert m["rougeL"] == pytest.approx(ROUGE1_F)
    assert m["rougeLsum"] == pytest.approx(ROUGE1_F)


def test_rouge_first_vs_max_reference():
    m = rouge_metrics([PRED], [["totally different words", REF]])
    assert m["rouge1"] == pytest.approx(0.0)
    assert m["rouge1_max"] == pytest.approx(ROUGE1_F)
    assert m["rouge2_max"] == pytest.approx(ROUGE2_F)


def test_rouge_mean_over_examples():
    m = rouge_metrics([PRED, "abc"], [[REF], ["xyz"]])
    assert m["rouge1"] == pytest.approx(ROUGE1_F / 2)


def test_rouge_stemmer_on():
    assert rouge_metrics(["cats running"], [["cat runs"]])["rouge1"] == pytest.approx(1.0)
    assert per_example_rouge1("cats running", ["cat runs"]) == pytest.approx(1.0)


def test_per_example_rouge1_uses_first_reference():
    assert per_example_rouge1(PRED, [REF, "other"]) == pytest.approx(ROUGE1_F)
    assert per_example_rouge1(PRED, ["other", REF]) == pytest.approx(0.0)


def test_classification_hand_computed():
    refs = ["yes", "yes", "no", "maybe"]
    preds = ["yes", "no", "no", "yes"]
    labels = ("yes", "no", "maybe")
    m = classification_metrics(preds, refs, labels)
    # correct at positions 0 and 2 -> accuracy 2/4 = 0.5
    assert m["accuracy"] == pytest.approx(0.5)
    # yes: predicted at 0 (yes), 3 (maybe) -> P = 1/2; gold at 0, 1 -> R = 1/2; F1 = 0.5
    assert m["f1_yes"] == pytest.approx(0.5)
    # no: predicted at 1 (yes), 2 (no) -> P = 1/2; gold at 2 -> R = 1; F1 = 2*0.5*1/1.5 = 2/3
    assert m["f1_no"] == pytest.approx(2 / 3)
    # maybe: never predicted -> F1 = 0 (zero_division=0)
    assert m["f1_maybe"] == pytest.approx(0.0)
    # macro = (0.5 + 2/3 + 0) / 3 = 0.38888...
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["macro_f1"] == pytest.approx(0.3889, abs=1e-4)
    # rows = gold (yes, no, maybe), cols = predicted (yes, no, maybe)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert m["labels"] == ["yes", "no", "maybe"]
    assert m["pred_counts"] == {"yes": 2, "no": 2, "maybe": 0}
    assert all(isinstance(v, int) for row in m["confusion_matrix"] for v in row)


def test_bleu_identical_is_one():
    sents = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine stitches"]
    assert bleu_metrics(sents, [[s] for s in sents])["bleu"] == pytest.approx(1.0)


def test_bleu_ragged_references():
    preds = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine stitches"]
    refs = [["the quick brown fox jumps over the lazy dog"], ["something else entirely here", preds[1]]]
    assert bleu_metrics(preds, refs)["bleu"] == pytest.approx(1.0)
    assert bleu_metrics(preds, [["x y z w"], ["p q r s"]])["bleu"] < 0.1


def test_generation_metrics_keys():
    m = generation_metrics([PRED], [[REF]])
    assert m["rouge1"] == pytest.approx(ROUGE1_F)
    assert 0.0 <= m["bleu"] <= 1.0
    assert m["mean_pred_words"] == pytest.approx(4.0)


def test_exact_match_case_insensitive():
    m = exact_match(["  Paris ", "berlin", "Rome"], [["paris"], ["Madrid", "BERLIN"], ["Milan"]])
    assert m["exact_match"] == pytest.approx(2 / 3)


def test_metric_fn_registry():
    assert metric_fn("rouge")([PRED], [[REF]])["rouge1"] == pytest.approx(ROUGE1_F)
    assert metric_fn("exact_match")(["a"], [["A"]], labels=None)["exact_match"] == pytest.approx(1.0)
    m = metric_fn("accuracy")(["yes", "no"], [["yes"], ["yes"]], labels=["yes", "no"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert metric_fn("macro_f1")(["yes", "no"], ["yes", "no"])["macro_f1"] == pytest.approx(1.0)


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ValueError, match="unknown metric") as exc:
        metric_fn("nope")
    for name in ("rouge", "bleu", "accuracy", "macro_f1", "exact_match"):
        assert name in str(exc.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda: rouge_metrics([], []),
        lambda: bleu_metrics([], []),
        lambda: generation_metrics([], []),
        lambda: exact_match([], []),
        lambda: classification_metrics([], [], ["a"]),
    ],
)
def test_empty_raises(call):
    with pytest.raises(ValueError, match="no predictions to score"):
        call()
