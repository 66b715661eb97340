"""Does a bag of words carry what the frozen model's states miss on PubMedQA? Repeated 10-fold CV.

    .venv/bin/python -m research.pubmedqa_feature_levers                # SmolLM2 feature cache first (~6 min)
    .venv/bin/python -m research.pubmedqa_feature_levers --model gemma-3-270m --layers 12 \\
        --cache runs/pubmedqa-features-gemma.pt                         # Gemma cache (optional: its rows are skipped)
    .venv/bin/python -m research.pubmedqa_lexical_levers                # the rows below, about a minute

The linear head on SmolLM2's layer-20 states plateaus near 0.54 / 0.43. Abstracts that answer "no" often say so in
words ("no significant difference", "did not"), which a mean over 400 token states may blur. This script scores:

- a TF-IDF logistic regression on the question and context words alone;
- late fusion: one head per feature set (SmolLM2 layer-20 mean, Gemma-3-270M last-token layer 12, TF-IDF), their
  log-probabilities summed, at three class weightings, since fusion moves accuracy and macro-F1 differently;
- the results the abstract reports, in a handful of counts (`peftlab.methods.text_features`, "reported-statistics"):
  p-values below and above 0.05, "no significant", "did not differ" and the like, alone and beside the other heads;
  and TF-IDF over word pairs, which keeps "no significant" whole where single words split it;
- a proxy for retrieved few-shot demos: the majority label of the k training questions nearest to each test
  question (TF-IDF cosine, or cosine of the centred layer-20 states). Demos retrieved that way can only pass on
  the answer as far as the neighbours' labels carry it.

Same folds (`peftlab cv`'s, 3 fold seeds), same standardised, class-weighted L2 logistic regression as
`research/pubmedqa_feature_levers.py` (both from `research.cvkit`, as are the fused heads and `feature_splits`,
shared with `research/pubmedqa_decision_levers.py`). Every text featurizer (`peftlab.methods.text_features`, the
code `linear-head`'s `method.head_text` runs) is fitted on each fold's training questions only.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import numpy as np

from peftlab.methods.text_features import FEATURE_SETS, example_text
from research.cvkit import Head, feature_splits, featurized, fold_scores, fused_cv, score_cells


def neighbour_cv(similarity: Callable, y: np.ndarray, folds, labels, k: int) -> list:
    """Per-fold (accuracy, macro-F1) of predicting the majority label among the k most similar training questions;
    `similarity(train, test)` is the (test x train) similarity matrix."""
    scores = []
    for train, test in folds:
        train, test = np.array(train), np.array(test)
        nearest = np.argsort(-similarity(train, test), axis=1)[:, :k]
        predicted = [np.bincount(y[train][row], minlength=3).argmax() for row in nearest]  # ties: the lower label
        scores.append(fold_scores(predicted, y[test], labels))
    return scores


def cosine(split: Callable) -> Callable:
    def similarity(train, test):
        a, b = split(train, test)
        if hasattr(a, "toarray"):  # TF-IDF rows are already unit length
            return (b @ a.T).toarray()
        a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
        return b @ a.T
    return similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    task, y, folds, smol, words, g12, examples = feature_splits(args.repeats)
    texts = [example_text(ex) for ex in examples]
    stats, pairs = (featurized(texts, FEATURE_SETS[name].make) for name in ("reported-statistics", "word-pairs"))
    rows: list[tuple[str, float, list[Head]]] = [(f"TF-IDF words, C={c}", 0.5, [(words, c)]) for c in (1, 3, 10)]
    rows.append(("SmolLM2 mean L20 (the recipe's features), C=0.01", 0.5, [(smol, 0.01)]))
    rows += [(f"SmolLM2 mean L20 + TF-IDF, class weights {b}", b, [(smol, 0.01), (words, 3)]) for b in (0.5, 1.0)]
    rows += [(f"reported statistics, C={c}", 0.5, [(stats, c)]) for c in (0.1, 1)]
    rows += [(f"TF-IDF words and word pairs, C={c}", 0.5, [(pairs, c)]) for c in (3, 10)]
    rows += [(f"SmolLM2 mean L20 + reported statistics, class weights {b}", b, [(smol, 0.01), (stats, 0.1)])
             for b in (0.5, 1.0)]
    for (name, tf), b in itertools.product((("words", words), ("word pairs", pairs)), (0.5, 0.75, 0.875, 1.0)):
        rows.append((f"SmolLM2 mean L20 + TF-IDF {name} + reported statistics, class weights {b}", b,
                     [(smol, 0.01), (tf, 3), (stats, 0.1)]))
    if g12 is not None:
        rows += [(f"SmolLM2 mean L20 + Gemma last-token L12 + TF-IDF, class weights {b}", b,
                  [(smol, 0.01), (g12, 0.003), (words, 3)]) for b in (0.5, 0.75, 1.0)]
    started = time.perf_counter()
    lines = ["| readout (heads' log-probabilities summed) | accuracy | std | macro-F1 | std | pooled confusion "
             "(rows = gold yes/no/maybe) |", "|---|---|---|---|---|---|"]
    for name, balance, heads in rows:
        scores, confusion = fused_cv(heads, y, folds, task.labels, balance)
        lines.append(f"| {name} | {score_cells(scores)} | {confusion.tolist()} |")
        print(lines[-1], flush=True)
    for (name, split), k in itertools.product((("TF-IDF", words), ("SmolLM2 mean L20", smol)), (1, 3, 5)):
        scores = neighbour_cv(cosine(split), y, folds, task.labels, k)
        lines.append(f"| majority label of the {k} nearest training questions ({name} cosine) | "
                     f"{score_cells(scores)} | |")
        print(lines[-1], flush=True)
    print(f"\npubmedqa, {args.repeats} x 10 folds, {time.perf_counter() - started:.0f} s of fits\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
