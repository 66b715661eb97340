"""Brittleness probe: do predictions survive changes to the prompt that should not matter?

Each test prompt is re-encoded with one perturbation at a time: a trailing space, changed newlines and spacing,
another of the task's instruction phrasings, or the context's sentences (PubMedQA: its abstract paragraphs; a
dialogue: its turns) in another order. The flip rate is the share of predictions that change against the
unperturbed prompt; the metric spread is max - min of the task's metric over the unperturbed and perturbed sets.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from pathlib import Path

from peftlab.core.config import RunConfig
from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_json
from peftlab.data.tasks import Example, Task, Template
from peftlab.evaluate.split_scoring import evaluate
from peftlab.methods.registry import Method
from peftlab.prompts.encoding import encode, few_shot_demos
from peftlab.prompts.format import Encoded, PromptFormat

PERTURBATIONS = ("trailing_space", "whitespace", "template", "reorder_context")


def _retemplate(task: Task, change: Callable[[Template], Template]) -> Task:
    return dataclasses.replace(task, templates=tuple(change(t) for t in task.templates))


def _context_units(ex: Example, field: str) -> tuple[list[str], str]:
    """The context split into reorderable units and the separator that joins them again."""
    contexts = ex.extra.get("contexts")
    if isinstance(contexts, list) and len(contexts) > 1:  # PubMedQA keeps its abstract's paragraphs
        return [c.strip() for c in contexts], " "
    text = ex.inputs[field]
    if "\n" in text.strip():  # a dialogue: reorder whole turns, not sentences across speakers
        return [line for line in text.split("\n") if line.strip()], "\n"
    return re.split(r"(?<=[.!?])\s+(?=\S)", text.strip()), " "


def reorder_context(ex: Example, field: str, seed: int = 0) -> Example | None:
    """The example with its context units in a seeded new order; None when there is nothing to reorder."""
    units, sep = _context_units(ex, field)
    if len(set(units)) < 2:
        return None
    order = units[:]
    random.Random(f"{seed}-{ex.id}").shuffle(order)
    if order == units:  # a shuffle can return the original order; rotate so the prompt really changes
        order = units[1:] + units[:1]
    return dataclasses.replace(ex, inputs={**ex.inputs, field: sep.join(order)})


def perturb(name: str, task: Task, examples: list[Example], template: int, seed: int = 0):
    """(task, examples, template, applicable mask) for one perturbation of the prompts."""
    if name == "trailing_space":
        return _retemplate(task, lambda t: Template(t.instruction, t.text + " ")), examples, template, None
    if name == "whitespace":
        spaced = _retemplate(task, lambda t: Template(t.instruction.replace(" ", "  "), t.text.replace("\n\n", "\n")))
        return spaced, examples, template, None
    if name == "template":
        if len(task.templates) < 2:
            return None
        return task, examples, (template + 1) % len(task.templates), None
    if name == "reorder_context":
        if task.context_field is None:
            return None
        moved = [reorder_context(ex, task.context_field, seed) for ex in examples]
        mask = [m is not None for m in moved]
        return task, [m or ex for m, ex in zip(moved, examples, strict=True)], template, mask
    raise PeftlabError(f"unknown perturbation '{name}'; valid: {', '.join(PERTURBATIONS)}")


def probe_model(
    model,
    fmt: PromptFormat,
    task: Task,
    examples: list[Example],
    template: int = 0,
    max_length: int = 512,
    shots=(),
    seed: int = 0,
    perturbations: tuple[str, ...] = PERTURBATIONS,
) -> dict:
    """Flip rates and metrics under each perturbation; returns the report written to probe.json."""

    def predict(t: Task, exs: list[Example], tpl: int) -> tuple[float, list[str]]:
        items: list[Encoded] = [encode(t, ex, fmt, max_length, tpl, shots) for ex in exs]
        metrics, rows = evaluate(model, fmt, task, exs, items, split="probe", progress=False)
        return metrics[task.primary_metric], [r["prediction"] for r in rows]

    metric, base = predict(task, examples, template)
    report: dict = {"n": len(examples), "metric": task.primary_metric, "unperturbed": metric, "perturbations": {}}
    flips_total, applicable_total = 0, 0
    for name in perturbations:
        spec = perturb(name, task, examples, template, seed)
        mask = spec[3] if spec else None
        if spec is None or (mask is not None and not any(mask)):
            continue
        value, preds = predict(*spec[:3])
        mask = mask or [True] * len(examples)
        flips = sum(m and p != b for m, p, b in zip(mask, preds, base, strict=True))
        report["perturbations"][name] = {
            "n_applicable": sum(mask), "flips": flips, "flip_rate": flips / sum(mask), task.primary_metric: value
        }
        flips_total, applicable_total = flips_total + flips, applicable_total + sum(mask)
    values = [metric] + [p[task.primary_metric] for p in report["perturbations"].values()]
    report["flip_rate"] = flips_total / applicable_total if applicable_total else 0.0
    report["metric_spread"] = max(values) - min(values)
    return report


def probe_metrics(report: dict) -> dict[str, float]:
    """The flat keys that go into result.json["metrics"]."""
    out = {"flip_rate": report["flip_rate"], "metric_spread": report["metric_spread"]}
    out.update({f"flip_rate_{k}": v["flip_rate"] for k, v in report["perturbations"].items()})
    return out


def probe_split(cfg: RunConfig, method: Method, model, fmt: PromptFormat, task: Task, splits: dict, run_dir: Path
                ) -> dict:
    """Probe the first `experiments.probe_limit` test examples of a run (`model`, trained by `method`); writes
    probe.json, returns its metrics."""
    examples = splits["test"][: cfg.experiments.probe_limit]
    if not examples:
        raise PeftlabError("the test split is empty; nothing to probe")
    # Few-shot runs keep their demos (as in train.run_training); only the query prompt is perturbed.
    k = method.shots(cfg.data.shots)
    shots = few_shot_demos(task, splits["train"], k, cfg.data.seed, cfg.data.template)
    report = probe_model(model, fmt, task, examples, cfg.data.template, cfg.data.max_length, shots, cfg.data.seed)
    write_json(Path(run_dir) / "probe.json", report)
    return probe_metrics(report)
