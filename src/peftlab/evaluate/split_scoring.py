"""Score one split: label scores (calibrated when asked) for classification, generation otherwise, then the
task's metrics and one prediction row per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peftlab.data.metrics import per_example_rouge1
from peftlab.data.tasks import Example, Task
from peftlab.evaluate.generation import generate
from peftlab.evaluate.scoring import calibrate, label_scores
from peftlab.prompts.format import Encoded, PromptFormat


@dataclass
class Predictions:
    """A model's answers to encoded examples; `scores`/`raw` are label scores (classification only)."""

    texts: list[str]
    scores: torch.Tensor | None = None  # after calibration, when the run calibrates
    raw: torch.Tensor | None = None  # as the model gave them

    def probabilities(self, labels: Sequence[str]) -> list[dict[str, float]]:
        """Each answer's distribution over the label set (the label scores, normalised)."""
        return [dict(zip(labels, row, strict=True)) for row in self.scores.softmax(-1).tolist()]


def predict(
    model,
    fmt: PromptFormat,
    task: Task,
    examples: Sequence[Example],
    items: Sequence[Encoded],
    max_tokens: int | None = None,
    progress: bool = True,
    content_free: Sequence[Encoded] = (),
    frozen: bool = False,
) -> Predictions:
    """Answer `examples` (encoded as `items`): the best label for classification, greedy generation otherwise.

    With `content_free` prompts (classification only), predictions are contextually calibrated: see `calibrate`.
    `frozen`: the model is the unchanged base, whose label scores are shared (`scoring.label_scores`).
    """
    model.eval()
    if task.kind != "classification":
        return Predictions(generate(model, fmt, items, task.max_new_tokens, progress=progress))
    raw = label_scores(model, fmt, items, task.labels, max_tokens, progress, examples=examples, frozen=frozen)
    scores = raw
    if content_free:
        bias = label_scores(model, fmt, content_free, task.labels, max_tokens, progress=False, frozen=frozen)
        scores = calibrate(raw, bias)
    return Predictions([task.labels[int(i)] for i in scores.argmax(-1)], scores, raw)


def evaluate(
    model,
    fmt: PromptFormat,
    task: Task,
    examples: Sequence[Example],
    items: Sequence[Encoded],
    split: str = "test",
    max_tokens: int | None = None,
    progress: bool = True,
    content_free: Sequence[Encoded] = (),
    frozen: bool = False,
) -> tuple[dict, list[dict]]:
    """Score `examples` (already encoded as `items`): returns flat metrics and one prediction row per example.

    `frozen`: as in `predict`."""
    references = [ex.references for ex in examples]
    answers = predict(model, fmt, task, examples, items, max_tokens, progress, content_free, frozen)
    predictions, raw = answers.texts, answers.raw
    if task.kind == "classification":
        per_example = [float(p == r[0]) for p, r in zip(predictions, references, strict=True)]
    else:
        per_example = [per_example_rouge1(p, r) for p, r in zip(predictions, references, strict=True)]
    metrics = {"task": task.name, "split": split, "n": len(examples), **task.score(predictions, references)}
    if task.kind == "classification" and content_free:  # what calibration changed, side by side
        before = task.score([task.labels[int(i)] for i in raw.argmax(-1)], references)
        metrics.update({f"uncalibrated_{k}": before[k] for k in ("accuracy", "macro_f1") if k in before})
    metrics["truncated_examples"] = sum(1 for e in items if e.truncated)
    rows = [
        {
            "id": ex.id,
            "split": split,
            "prompt": fmt.tokenizer.decode(e.prompt_ids),
            "prediction": pred,
            "references": list(ex.references),
            "score": score,
        }
        for ex, e, pred, score in zip(examples, items, predictions, per_example, strict=True)
    ]
    if task.kind == "classification":
        for row, s in zip(rows, raw.tolist(), strict=True):
            row["label_logprobs"] = dict(zip(task.labels, s, strict=True))
    return metrics, rows
