"""Custom tasks from a YAML file: a JSONL path, input fields, a target field, a prompt template and a metric.

name: sentiment
data: data/reviews.jsonl        # optional default data file
inputs: [review]                # fields rendered into the template; the first one may be truncated
target: label
template: "Review: {review}\\n\\nIs this review positive or negative?"
metric: accuracy                # rouge | bleu | accuracy | macro_f1 | exact_match
labels: [positive, negative]    # classification only
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import yaml

from peftlab.core.errors import PeftlabError, data_error
from peftlab.data.metrics import METRICS, metric_fn
from peftlab.data.tasks.base import Example, Task, Template, optional_id, read_jsonl, require_split, require_text

CLASSIFICATION_METRICS = {"accuracy", "macro_f1"}


@dataclass
class CustomTaskSpec:
    """The YAML schema of a custom task."""

    name: str
    inputs: list[str]
    target: str
    template: str
    metric: str = "rouge"
    labels: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)  # further phrasings, FLAN style
    data: str | None = None
    id_field: str = "id"
    max_new_tokens: int = 64


def _load(spec: CustomTaskSpec, path: Path) -> list[Example]:
    examples = []
    for lineno, obj in read_jsonl(path):
        target = require_text(path, lineno, obj, spec.target).strip()
        if spec.labels and target not in spec.labels:
            raise data_error(path, lineno, spec.target, f"unknown label '{target}'; valid: {', '.join(spec.labels)}")
        examples.append(
            Example(
                id=optional_id(path, lineno, obj, (spec.id_field,), f"line{lineno}"),
                inputs={k: require_text(path, lineno, obj, k).strip() for k in spec.inputs},
                target=target,
                references=(target,),
                split=require_split(path, lineno, obj),
            )
        )
    return examples


def _classify(labels: tuple[str, ...], metric: str, predictions, references) -> dict:
    return metric_fn(metric)(predictions, [r[0] for r in references], labels=labels)


def load_spec(path: Path) -> CustomTaskSpec:
    """Parse and check a custom task YAML; unknown keys and bad values are errors naming the file."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
    known = {f.name for f in fields(CustomTaskSpec)}
    for key in raw:
        if key not in known:
            raise data_error(path, None, key, f"unknown key; valid: {', '.join(sorted(known))}")
    for key in ("name", "inputs", "target", "template"):
        if key not in raw:
            raise data_error(path, None, key, "missing")
    spec = CustomTaskSpec(**raw)
    if spec.metric not in METRICS:
        raise data_error(path, None, "metric", f"unknown metric '{spec.metric}'; valid: {', '.join(sorted(METRICS))}")
    if spec.metric in CLASSIFICATION_METRICS and not spec.labels:
        raise data_error(path, None, "labels", f"metric '{spec.metric}' needs a label set")
    return spec


def make_task(path: Path) -> Task:
    spec = load_spec(path)
    classification = spec.metric in CLASSIFICATION_METRICS
    labels = tuple(spec.labels)
    score = partial(_classify, labels, spec.metric) if classification else metric_fn(spec.metric)
    try:
        templates = tuple(Template("", t) for t in [spec.template, *spec.templates])
        for t in templates:
            t.render({k: "x" for k in spec.inputs})
    except KeyError as err:
        raise PeftlabError(f"{path}: field 'template': placeholder {err} is not one of inputs {spec.inputs}") from None
    return Task(
        name=spec.name,
        kind="classification" if classification else "generation",
        load=partial(_load, spec),
        templates=templates,
        score=score,
        primary_metric="accuracy" if classification else ("rouge1" if spec.metric == "rouge" else spec.metric),
        labels=labels,
        context_field=spec.inputs[0],
        max_new_tokens=spec.max_new_tokens,
        description=f"custom task from {path}",
    )
