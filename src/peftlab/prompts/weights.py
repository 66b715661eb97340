"""Class-balanced example weights: each example's loss counts `(n / (k * count)) ** power` times."""

from __future__ import annotations

import torch

from peftlab.data.tasks import Task
from peftlab.prompts.format import Encoded, PromptFormat


def class_weights(y: torch.Tensor, n_classes: int, power: float) -> dict[int, float]:
    """(n / (k * count)) ** power per class: 1 is fully balanced, 0 is unweighted, between is a softer correction."""
    counts = torch.bincount(y, minlength=n_classes).clamp(min=1).float()
    weights = (len(y) / (n_classes * counts)) ** power
    return {c: float(w) for c, w in enumerate(weights)}


def example_weights(task: Task, fmt: PromptFormat, items: list[Encoded], power: float) -> list[float] | None:
    """Per-item loss weights that lift the rare classes of a classification task: (n / (k * count)) ** power.

    A run that learns the label prior instead of the task collapses to the majority answer (naive LoRA on PubMedQA
    answered "yes" 498 times of 500); weighting the loss makes every class pull as hard (power 1) or part way
    (0.5). The class of an item is the label word its target begins with; items whose target begins with none weigh 1.
    None when there is nothing to weight (power 0, or not a classification task).
    """
    if not power or task.kind != "classification" or not task.labels:
        return None
    whole = {tuple(fmt.target_ids(label)): k for k, label in enumerate(task.labels)}
    words = [tuple(fmt.label_ids(label)) for label in task.labels]
    classes = [_label_of(tuple(e.target_ids), whole, words) for e in items]
    known = torch.tensor([c for c in classes if c is not None], dtype=torch.long)
    if len(known) == 0:
        return None
    weights = class_weights(known, len(task.labels), power)
    return [1.0 if c is None else weights[c] for c in classes]


def _label_of(target: tuple[int, ...], whole: dict[tuple[int, ...], int], words: list[tuple[int, ...]]) -> int | None:
    """The class whose whole target (label word and end of turn) is `target`, or else the one class whose label word
    begins it (an answer followed by its reasoning, `Task.train_target`); None if none, or more than one, fits."""
    if target in whole:
        return whole[target]
    begins = [k for k, word in enumerate(words) if target[: len(word)] == word]
    return begins[0] if len(begins) == 1 else None
