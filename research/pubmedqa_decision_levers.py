"""Is the heads' argmax the right decision rule for macro-F1 on PubMedQA? Repeated 10-fold CV.

    .venv/bin/python -m research.pubmedqa_feature_levers                # SmolLM2 feature cache first (~6 min)
    .venv/bin/python -m research.pubmedqa_decision_levers               # the rows below, a few minutes

Hypothesis, written before the run: class weights move every class's share of the answers together, along one
line from accuracy to macro-F1 (docs/results.md: 0.601 / 0.420 at square-root weights, 0.565 / 0.438 balanced).
The argmax of a head's log-probabilities maximises expected accuracy, not macro-F1. One offset per class added to
the log-probabilities, chosen on each training fold's own out-of-fold predictions, answers "no" and "maybe" where
they pay for macro-F1: +2-3 points of macro-F1 for at most 1 point of accuracy, enough for 60 / 45 with the fused
heads.

For every outer fold (`peftlab cv`'s folds, 3 fold seeds):
1. the heads (standardised, class-weighted L2 logistic regressions, as in `research/pubmedqa_lexical_levers.py`)
   are fitted on 5 stratified splits of the fold's training questions, which gives every training question a
   prediction from heads that never saw it;
2. the offsets for "no" and "maybe" (that of "yes" stays 0) are those on a grid that score best on those
   out-of-fold predictions, for one of two objectives: macro-F1, or the mean of accuracy and macro-F1;
3. the heads are fitted on all the training questions and the offsets added to their test log-probabilities.

The test questions never choose anything.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from research.cvkit import Head, feature_splits, fold_scores, fused_logp, score_cells

GRID = np.linspace(-2.0, 3.0, 26)  # offsets tried for "no" and for "maybe", in nats


def out_of_fold_logp(heads: list[Head], y: np.ndarray, train: np.ndarray, balance: float) -> np.ndarray:
    """Each training question's summed log-probabilities from heads fitted on the other 4/5 of `train`."""
    from sklearn.model_selection import StratifiedKFold

    logp = np.zeros((len(train), 3))
    for inner_train, inner_test in StratifiedKFold(5, shuffle=True, random_state=0).split(train, y[train]):
        logp[inner_test] = fused_logp(heads, y, train[inner_train], train[inner_test], balance)
    return logp


def grid_scores(logp: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, macro-F1) of argmax(logp + offsets) for every (no, maybe) offset pair on `GRID`, as matrices."""
    no, maybe = np.meshgrid(GRID, GRID, indexing="ij")
    offsets = np.stack([np.zeros_like(no), no, maybe], -1)  # (grid, grid, 3)
    predicted = (logp[None, None] + offsets[:, :, None]).argmax(-1)  # (grid, grid, questions)
    accuracy = (predicted == y).mean(-1)
    f1 = []
    for c in range(3):
        tp = ((predicted == c) & (y == c)).sum(-1)
        fp_fn = (predicted == c).sum(-1) + (y == c).sum()
        f1.append(np.where(fp_fn > 0, 2 * tp / np.maximum(fp_fn, 1), 0.0))
    return accuracy, np.mean(f1, 0)


def chosen_offsets(logp: np.ndarray, y: np.ndarray, objective: str) -> np.ndarray:
    accuracy, f1 = grid_scores(logp, y)
    score = f1 if objective == "macro-F1" else (accuracy + f1) / 2
    i, j = np.unravel_index(score.argmax(), score.shape)
    return np.array([0.0, GRID[i], GRID[j]])


def offset_cv(heads: list[Head], y: np.ndarray, folds, labels, balance: float) -> dict[str, tuple]:
    """Per rule (argmax, and offsets for each objective): per-fold (accuracy, macro-F1) and the pooled confusion."""
    rules = ("argmax", "macro-F1", "mean of accuracy and macro-F1")
    scores = {r: [] for r in rules}
    confusion = {r: np.zeros((3, 3), dtype=int) for r in rules}
    for train, test in folds:
        train, test = np.array(train), np.array(test)
        inner = out_of_fold_logp(heads, y, train, balance)
        logp = fused_logp(heads, y, train, test, balance)
        for rule in rules:
            offsets = np.zeros(3) if rule == "argmax" else chosen_offsets(inner, y[train], rule)
            predicted = (logp + offsets).argmax(1)
            np.add.at(confusion[rule], (y[test], predicted), 1)
            scores[rule].append(fold_scores(predicted, y[test], labels))
    return {r: (scores[r], confusion[r]) for r in rules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    task, y, folds, smol, words, g12, _ = feature_splits(args.repeats)
    rows: list[tuple[str, float, list[Head]]] = [
        ("SmolLM2 mean L20 (the recipe's features)", 0.5, [(smol, 0.01)]),
        ("SmolLM2 mean L20 + TF-IDF", 0.5, [(smol, 0.01), (words, 3)]),
    ]
    if g12 is not None:
        rows.append(("SmolLM2 mean L20 + Gemma last-token L12 + TF-IDF", 0.5, [(smol, 0.01), (g12, 0.003),
                                                                                 (words, 3)]))
    started = time.perf_counter()
    lines = ["| heads (square-root class weights) | decision rule | accuracy | std | macro-F1 | std | pooled "
             "confusion (rows = gold yes/no/maybe) |", "|---|---|---|---|---|---|---|"]
    for name, balance, heads in rows:
        for rule, (scores, confusion) in offset_cv(heads, y, folds, task.labels, balance).items():
            rule_name = rule if rule == "argmax" else f"offsets chosen for {rule}"
            lines.append(f"| {name} | {rule_name} | {score_cells(scores)} | {confusion.tolist()} |")
            print(lines[-1], flush=True)
    print(f"\npubmedqa, {args.repeats} x 10 folds, {time.perf_counter() - started:.0f} s of fits\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
