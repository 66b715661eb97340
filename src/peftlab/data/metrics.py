"""Evaluation metrics for classification and generation tasks.

All functions are pure (no I/O) and delegate the math to well-kept libraries:
scikit-learn for classification, ``rouge_score`` for ROUGE and ``sacrebleu`` for BLEU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")

MetricFn = Callable[..., dict[str, Any]]


def _check_nonempty(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    """Raise ValueError for empty inputs or mismatched lengths."""
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")


def _as_ref_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Normalise references to a list of non-empty reference lists (a bare string becomes a one-item list)."""
    out: list[list[str]] = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs:
            raise ValueError(f"example {i} has no reference strings")
        out.append(refs)
    return out


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    """Build the shared ROUGE scorer once (stemming on, all four ROUGE variants)."""
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def classification_metrics(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label F1 and confusion matrix for label predictions.

    Args:
        predictions: predicted label strings.
        references: gold label strings, aligned with ``predictions``.
        labels: the label set; fixes the order of the confusion matrix and the labels macro-F1 averages over.

    Returns:
        ``{"accuracy", "macro_f1", "f1_<label>" for each label, "confusion_matrix" (rows = reference,
        cols = prediction, in ``labels`` order), "labels", "pred_counts"}``. Scores are fractions in [0, 1].
    """
    _check_nonempty(predictions, references)
    labels = list(labels)
    if not labels:
        raise ValueError("labels must not be empty")
    preds, refs = list(predictions), list(references)
    per_label = f1_score(refs, preds, labels=labels, average=None, zero_division=0)
    result: dict[str, Any] = {
        "accuracy": float(accuracy_score(refs, preds)),
        "macro_f1": float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0)),
    }
    for label, score in zip(labels, per_label, strict=True):
        result[f"f1_{label}"] = float(score)
    result["confusion_matrix"] = confusion_matrix(refs, preds, labels=labels).astype(int).tolist()
    result["labels"] = labels
    result["pred_counts"] = {label: sum(1 for p in preds if p == label) for label in labels}
    return result


def rouge_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE F-measures (rouge_score, stemmer on).

    ``rouge1``/``rouge2``/``rougeL``/``rougeLsum`` score each prediction against its FIRST reference;
    the ``*_max`` keys take, per example, the best score over all references. Text is passed through as is
    (``rougeLsum`` treats newlines as sentence boundaries).
    """
    _check_nonempty(predictions, references)
    ref_lists = _as_ref_lists(references)
    scorer = _rouge_scorer()
    first = {t: 0.0 for t in ROUGE_TYPES}
    best = {t: 0.0 for t in ROUGE_TYPES}
    for pred, refs in zip(predictions, ref_lists, strict=True):
        scores = [scorer.score(ref, pred) for ref in refs]
        for t in ROUGE_TYPES:
            first[t] += scores[0][t].fmeasure
            best[t] += max(s[t].fmeasure for s in scores)
    n = len(predictions)
    result = {t: first[t] / n for t in ROUGE_TYPES}
    result.update({f"{t}_max": best[t] / n for t in ROUGE_TYPES})
    return result


def bleu_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu) over all references, as a fraction in [0, 1].

    Ragged reference lists are padded by repeating each example's first reference so every example has
    the same number of references.
    """
    _check_nonempty(predictions, references)
    ref_lists = _as_ref_lists(references)
    width = max(len(refs) for refs in ref_lists)
    padded = [refs + [refs[0]] * (width - len(refs)) for refs in ref_lists]
    ref_streams = [[refs[k] for refs in padded] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(list(predictions), ref_streams)
    return {"bleu": float(bleu.score) / 100.0}


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE + BLEU + ``mean_pred_words`` (mean whitespace-token count of the predictions)."""
    result = rouge_metrics(predictions, references)
    result.update(bleu_metrics(predictions, references))
    result["mean_pred_words"] = sum(len(p.split()) for p in predictions) / len(predictions)
    return result


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Fraction of predictions equal (stripped, lower-cased) to any of their references."""
    _check_nonempty(predictions, references)
    ref_lists = _as_ref_lists(references)
    hits = 0
    for pred, refs in zip(predictions, ref_lists, strict=True):
        if pred.strip().lower() in {r.strip().lower() for r in refs}:
            hits += 1
    return {"exact_match": hits / len(predictions)}


def per_example_rouge1(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-1 F-measure of one prediction against its first reference."""
    refs = _as_ref_lists([references])[0]
    return float(_rouge_scorer().score(refs[0], prediction)["rouge1"].fmeasure)


def _classification_for_metric(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Classification metrics for the registry: uses the first reference; labels default to sorted gold labels."""
    _check_nonempty(predictions, references)
    refs = [refs[0] for refs in _as_ref_lists(references)]
    if labels is None:
        labels = sorted(set(refs))
    return classification_metrics(predictions, refs, labels)


def _ignore_labels(fn: Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, Any]]) -> MetricFn:
    """Adapt a (predictions, references) metric to the (predictions, references, labels=None) signature."""

    @functools.wraps(fn)
    def wrapped(
        predictions: Sequence[str], references: Sequence[Sequence[str]], labels: Sequence[str] | None = None
    ) -> dict[str, Any]:
        return fn(predictions, references)

    return wrapped


METRICS: dict[str, MetricFn] = {
    "rouge": _ignore_labels(rouge_metrics),
    "bleu": _ignore_labels(bleu_metrics),
    "accuracy": _classification_for_metric,
    "macro_f1": _classification_for_metric,
    "exact_match": _ignore_labels(exact_match),
}


def metric_fn(name: str) -> MetricFn:
    """Return the metric callable ``(predictions, references, labels=None) -> dict`` registered as ``name``.

    Raises:
        ValueError: if ``name`` is not registered; the message lists the valid names.
    """
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(sorted(METRICS))}") from None
