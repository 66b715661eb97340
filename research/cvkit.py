"""What every PubMedQA lever script shares: the folds, the cross-validation of linear heads, cached feature passes
and the table cells their scores print in.

Imported as `from research.cvkit import ...` by scripts run from the repository root as modules
(`.venv/bin/python -m research.pubmedqa_feature_levers`). Research code, not part of the package: it imports
peftlab, and peftlab never imports it.

- folds: `task_folds` (the task, its examples, their label indices and `repeated_folds`, the folds `peftlab cv`
  uses, over several fold seeds);
- scores: `fold_scores` (one fold's accuracy and macro-F1), `summarise` (their mean and spread over folds),
  `score_cells` and `summary_cells` (the markdown cells of either form);
- linear heads: `logistic` (a class-weighted L2 logistic regression), `cross_validate` (a standardised one over
  every fold), and for late fusion the per-fold splits (`standardised`, `featurized`), `fused_logp`, `fused_cv`
  and `feature_splits` (the feature sets the fused heads read);
- caching: `cached` (a feature pass saved under runs/ the first time, loaded after).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from peftlab.data.metrics import classification_metrics
from peftlab.data.splits import kfold_examples
from peftlab.data.tasks import DEFAULT_DATA, get_task
from peftlab.methods.text_features import FEATURE_SETS, example_text
from peftlab.prompts.weights import class_weights

# `research.pubmedqa_feature_levers`'s caches: SmolLM2's (the default run) and Gemma-3-270M's (`--model
# gemma-3-270m --cache runs/pubmedqa-features-gemma.pt`).
FEATURES = Path("runs/pubmedqa-features.pt")
GEMMA_FEATURES = Path("runs/pubmedqa-features-gemma.pt")

# A head: (train indices, test indices) -> (train matrix, test matrix), and its L2 strength C.
Head = tuple[Callable[[np.ndarray, np.ndarray], tuple], float]


# Folds


def repeated_folds(examples, repeats: int) -> list[tuple[list[int], list[int]]]:
    """(train, test) example indices of `peftlab cv`'s 10 folds (`kfold_examples`), for fold seeds 0..repeats-1."""
    index = {ex.id: i for i, ex in enumerate(examples)}
    folds = []
    for seed, fold in itertools.product(range(repeats), range(10)):
        split = kfold_examples(examples, 10, fold, seed)
        folds.append(([index[e.id] for e in split["train"]], [index[e.id] for e in split["test"]]))
    return folds


def task_folds(task_name: str, repeats: int):
    """The task, its shipped examples, their label indices and `repeated_folds` of them."""
    task = get_task(task_name)
    examples = task.load(Path(DEFAULT_DATA[task.name]))
    y = np.array([task.labels.index(ex.target) for ex in examples])
    return task, examples, y, repeated_folds(examples, repeats)


# Cached feature passes


def cached(path: Path, make):
    """The tensors saved at `path`, or `make()`'s, saved there first."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


# Scores and their table cells


def fold_scores(predicted, gold, labels) -> tuple[float, float]:
    """(accuracy, macro-F1) of one fold's predicted label indices against the gold ones."""
    m = classification_metrics([labels[i] for i in predicted], [labels[i] for i in gold], labels)
    return m["accuracy"], m["macro_f1"]


def summarise(accuracy: list[float], macro_f1: list[float]) -> dict[str, float]:
    """Mean and spread of per-fold accuracy and macro-F1."""
    return {"accuracy": statistics.fmean(accuracy), "acc_std": statistics.stdev(accuracy),
            "macro_f1": statistics.fmean(macro_f1), "f1_std": statistics.stdev(macro_f1)}


def score_cells(scores: list) -> str:
    """Table cells for per-fold (accuracy, macro-F1) pairs: mean and spread of each."""
    acc, f1 = zip(*scores, strict=True)
    return (f"{statistics.fmean(acc):.3f} | {statistics.stdev(acc):.3f} | {statistics.fmean(f1):.3f} | "
            f"{statistics.stdev(f1):.3f}")


def summary_cells(s: dict) -> str:
    """Table cells for a `summarise` dict (or `cross_validate`'s): accuracy, its std, macro-F1, its std."""
    return f"{s['accuracy']:.3f} | {s['acc_std']:.3f} | {s['macro_f1']:.3f} | {s['f1_std']:.3f}"


# Linear heads


def logistic(c: float, y: np.ndarray, balance: float = 0.5, classes: int = 3):
    """An unfitted L2 logistic regression at `c`, class-weighted for labels `y` (`class_weights` at `balance`)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight=class_weights(torch.from_numpy(y), classes, balance), max_iter=3000)


def cross_validate(x: np.ndarray, y: np.ndarray, folds, labels, c: float, balance: float) -> dict[str, float]:
    """Mean and spread of test accuracy and macro-F1 over the given (train, test) index folds."""
    from threadpoolctl import threadpool_limits

    accuracy, macro_f1 = [], []
    for train, test in folds:
        x_train, x_test = standardised(x)(train, test)
        clf = logistic(c, y[train], balance, len(labels))
        with threadpool_limits(1):  # small fits: two BLAS threads fight each other (see methods.head.fit_logistic)
            clf.fit(x_train, y[train])
        acc, f1 = fold_scores(clf.predict(x_test), y[test], labels)
        accuracy.append(acc)
        macro_f1.append(f1)
    return summarise(accuracy, macro_f1)


def standardised(x: np.ndarray) -> Callable:
    """A per-fold split of `x`, standardised by the fold's training rows."""
    def split(train, test):
        mean, scale = x[train].mean(0), x[train].std(0) + 1e-6
        return (x[train] - mean) / scale, (x[test] - mean) / scale
    return split


def featurized(texts: list[str], make: Callable) -> Callable:
    """A per-fold split of a `peftlab.methods.text_features` featurizer, fitted on the fold's training texts only."""
    def split(train, test):
        featurizer = make()
        return featurizer.fit_transform([texts[i] for i in train]), featurizer.transform([texts[i] for i in test])
    return split


def fused_logp(heads: list[Head], y: np.ndarray, train: np.ndarray, test: np.ndarray, balance: float) -> np.ndarray:
    """Summed log-probabilities on `test` of the heads fitted on `train`."""
    from threadpoolctl import threadpool_limits

    logp = np.zeros((len(test), 3))
    for split, c in heads:
        x_train, x_test = split(train, test)
        clf = logistic(c, y[train], balance)
        with threadpool_limits(1):  # small fits: two BLAS threads fight each other (see methods.head.fit_logistic)
            clf.fit(x_train, y[train])
        logp += np.log(clf.predict_proba(x_test) + 1e-9)
    return logp


def fused_cv(heads: list[Head], y: np.ndarray, folds, labels, balance: float) -> tuple[list, np.ndarray]:
    """Each head fitted per fold; the prediction is the argmax of their summed log-probabilities.
    Returns the per-fold (accuracy, macro-F1) and the confusion matrix pooled over every fold."""
    scores, confusion = [], np.zeros((3, 3), dtype=int)
    for train, test in folds:
        train, test = np.array(train), np.array(test)
        predicted = fused_logp(heads, y, train, test, balance).argmax(1)
        np.add.at(confusion, (y[test], predicted), 1)
        scores.append(fold_scores(predicted, y[test], labels))
    return scores, confusion


def feature_splits(repeats: int):
    """(task, label indices, folds, SmolLM2 layer-20 means, TF-IDF words, Gemma last-token layer 12 or None when
    its cache is missing, the examples): the feature sets the lever scripts' heads read, each as a per-fold split."""
    task, examples, y, folds = task_folds("pubmedqa", repeats)
    smol = standardised(torch.load(FEATURES, weights_only=True)["mean"][20].numpy())
    words = featurized([example_text(ex) for ex in examples], FEATURE_SETS["words"].make)
    gemma = GEMMA_FEATURES
    g12 = standardised(torch.load(gemma, weights_only=True)["last"][12].numpy()) if gemma.is_file() else None
    return task, y, folds, smol, words, g12, examples
