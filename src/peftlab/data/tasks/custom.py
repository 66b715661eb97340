"""Tasks from the user's own files: the `alpaca` and `chat` formats by name, or a task YAML.

A task YAML describes any file of records (JSONL, JSON, CSV or Parquet):

    name: sentiment
    format: fields                  # fields (the default) | alpaca | chat
    data: data/reviews.jsonl        # optional default data file
    inputs: [review]                # fields: rendered into the template; the first one may be truncated
    target: label                   # fields: the field the model learns to write
    template: "Review: {review}\\n\\nIs this review positive or negative?"
    templates: []                   # further phrasings, FLAN style (data.template picks one)
    metric: accuracy                # rouge | bleu | accuracy | macro_f1 | exact_match
    labels: [positive, negative]    # classification only
    id_field: id
    max_new_tokens: 64

With `format: alpaca` or `chat` only `name`, `metric`, `labels` and `max_new_tokens` apply: the records say the rest.
A row may carry `split: train | val | test`; any other value is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, get_type_hints

from peftlab.core.errors import PeftlabError, data_error
from peftlab.core.yamlio import describe, read_yaml
from peftlab.data.metrics import METRICS, generation_metrics, metric_fn
from peftlab.data.tasks.base import Example, Task, Template, optional_id, require_split, require_text
from peftlab.data.tasks.formats import alpaca_example, chat_example, match_label, read_records

CLASSIFICATION_METRICS = {"accuracy", "macro_f1"}
FORMATS = ("fields", "alpaca", "chat")


@dataclass
class CustomTaskSpec:
    """The YAML schema of a custom task."""

    name: str
    format: str = "fields"
    inputs: list[str] = field(default_factory=list)
    target: str = ""
    template: str = ""
    metric: str = "rouge"
    labels: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)  # further phrasings, FLAN style
    data: str | None = None
    id_field: str = "id"
    max_new_tokens: int = 64


def _field_example(spec: CustomTaskSpec, path: Path, line: int, obj: dict, labelled: bool) -> Example:
    target = require_text(path, line, obj, spec.target).strip() if labelled or spec.target in obj else ""
    return Example(
        id=optional_id(path, line, obj, (spec.id_field,), f"line{line}"),
        inputs={k: require_text(path, line, obj, k).strip() for k in spec.inputs},
        target=target,
        references=(target,) if target else (),
        split=require_split(path, line, obj),
        source=f"{path}:{line}",
    )


def _load(spec: CustomTaskSpec, path: Path, labelled: bool = True) -> list[Example]:
    """Every record of the file as an example; a label outside the task's label set is an error.

    A label equal to one of the set up to case and surrounding space ("Yes " for `yes`) is read as the set's
    spelling, so that scoring compares like with like.
    """
    read = {"alpaca": alpaca_example, "chat": chat_example}.get(spec.format, partial(_field_example, spec))
    examples = []
    for line, obj in read_records(path):
        ex = read(path, line, obj, labelled=labelled)
        if spec.labels and ex.target:
            label = match_label(ex.target, spec.labels)
            if label is None:
                where = spec.target or ("output" if spec.format == "alpaca" else "messages")
                raise data_error(path, line, where, f"unknown label {ex.target!r}; valid: {', '.join(spec.labels)}")
            ex = replace(ex, target=label, references=(label,))
        examples.append(ex)
    return examples


def _check_type(path: Path, key: str, value: Any, tp: Any) -> None:
    """A task YAML value of the type its field holds: text, a whole number, or a list of text."""
    if tp == list[str]:
        bad = [value] if not isinstance(value, list) else [v for v in value if not isinstance(v, str)]
        if bad:
            number = isinstance(bad[0], int | float) and not isinstance(bad[0], bool)
            hint = f" (quote it: '{bad[0]}')" if number else ""
            raise data_error(path, None, key, f"expected a list of text, got {describe(bad[0])}{hint}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise data_error(path, None, key, f"expected a whole number >= 1, got {describe(value)}")
    elif not isinstance(value, str):
        raise data_error(path, None, key, f"expected text, got {describe(value)}")


def load_spec(path: Path) -> CustomTaskSpec:
    """Parse and check a custom task YAML; unknown keys and bad values are errors naming the file."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else describe(raw)
        raise PeftlabError(f"{path}: expected a task mapping (name, format, inputs, target, template, metric, ...), "
                           f"got {got}")
    known = get_type_hints(CustomTaskSpec)
    for key in raw:
        if key not in known:
            raise data_error(path, None, str(key), f"unknown key; valid: {', '.join(sorted(known))}")
    raw = {key: value for key, value in raw.items() if value is not None}  # `labels:` left empty: not given
    for key, value in raw.items():
        _check_type(path, key, value, known[key])
    fmt = raw.get("format", "fields")
    if fmt not in FORMATS:
        raise data_error(path, None, "format", f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    for key in ("name", *(("inputs", "target", "template") if fmt == "fields" else ())):
        if key not in raw:
            raise data_error(path, None, key, "missing")
    spec = CustomTaskSpec(**raw)
    if spec.metric not in METRICS:
        raise data_error(path, None, "metric", f"unknown metric '{spec.metric}'; valid: {', '.join(sorted(METRICS))}")
    if spec.metric in CLASSIFICATION_METRICS and not spec.labels:
        raise data_error(path, None, "labels", f"metric '{spec.metric}' needs a label set")
    return spec


def _templates(spec: CustomTaskSpec, path: Path | None) -> tuple[Template, ...]:
    if spec.format == "alpaca":
        return (Template("", "{instruction}{input}"),)
    if spec.format == "chat":  # the chat template renders the turns; this phrasing serves few-shot demos only
        return (Template("", "{conversation}"),)
    try:
        templates = tuple(Template("", t) for t in [spec.template, *spec.templates])
        for t in templates:
            t.render({k: "x" for k in spec.inputs})
    except KeyError as err:
        raise PeftlabError(f"{path}: field 'template': placeholder {err} is not one of inputs {spec.inputs}") from None
    return templates


def task_from_spec(spec: CustomTaskSpec, path: Path | None = None) -> Task:
    """The task a spec describes. Labels make it classification; the open formats can be relabelled from data."""
    labels = tuple(spec.labels)
    classification = bool(labels) and (spec.metric in CLASSIFICATION_METRICS or spec.format != "fields")
    if classification:
        metric = spec.metric if spec.metric in CLASSIFICATION_METRICS else "accuracy"
        score, primary = partial(_classify, labels, metric), "accuracy"
    elif spec.format != "fields":
        score, primary = generation_metrics, "rouge1"
    else:
        score, primary = metric_fn(spec.metric), "rouge1" if spec.metric == "rouge" else spec.metric
    context = {"alpaca": "input", "chat": None}.get(spec.format, spec.inputs[0] if spec.inputs else None)
    return Task(
        name=spec.name,
        kind="classification" if classification else "generation",
        load=partial(_load, spec),
        templates=_templates(spec, path),
        score=score,
        primary_metric=primary,
        labels=labels,
        context_field=context,
        max_new_tokens=spec.max_new_tokens,
        description=f"custom task from {path}" if path else f"{spec.format} records",
        load_unlabelled=partial(_load, spec, labelled=False),
        relabel=None if spec.format == "fields" else partial(_relabel, spec, path),
        read_record=None if spec.format == "fields" else partial(_record, spec),
    )


def _record(spec: CustomTaskSpec, obj: dict) -> Example:
    read = alpaca_example if spec.format == "alpaca" else chat_example
    return read(Path("request"), 1, obj, labelled=False)


def _relabel(spec: CustomTaskSpec, path: Path | None, labels: tuple[str, ...]) -> Task:
    return task_from_spec(replace(spec, labels=list(labels)), path)


def _classify(labels: tuple[str, ...], metric: str, predictions, references) -> dict:
    return metric_fn(metric)(predictions, [r[0] for r in references], labels=labels)


def make_task(path: Path) -> Task:
    """A task from a task YAML."""
    return task_from_spec(load_spec(path), path)


def make_format_task(fmt: str) -> Task:
    """The `alpaca` or `chat` task: generation until the data (or `data.labels`) gives it a label set."""
    return task_from_spec(CustomTaskSpec(name=fmt, format=fmt))
