"""What a task is: how to read its file, how to phrase its prompt, and how to score it.

A task is data, not a class hierarchy: a `Task` value holds its loader, its instruction phrasings and its metric.
Adding a task is one small module that builds a `Task` and registers it (see `tasks/__init__.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftlab.core.errors import data_error

TaskKind = Literal["classification", "generation"]


Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Example:
    """One item of a task: named input texts, the training target and the references it is scored against."""

    id: str
    inputs: dict[str, str]
    target: str
    references: tuple[str, ...]
    split: str | None = None  # a split the file itself assigns, if any
    extra: dict[str, Any] = field(default_factory=dict)
    image: str | None = None  # path of the example's image; only vision-language models read it


@dataclass(frozen=True)
class Template:
    """One instruction phrasing. `text` is a format string over the example's input names and `{instruction}`."""

    instruction: str
    text: str

    def render(self, inputs: dict[str, str]) -> str:
        return self.text.format(instruction=self.instruction, **inputs)


@dataclass(frozen=True)
class Task:
    """A task: loader, phrasings (FLAN style, selectable by index), metric and decoding budget."""

    name: str
    kind: TaskKind
    load: Callable[[Path], list[Example]]
    templates: tuple[Template, ...]
    score: Callable[[Sequence[str], Sequence[Sequence[str]]], dict]
    primary_metric: str
    labels: tuple[str, ...] = ()
    # The one input that truncation may shorten. The question, the instruction and the target are never cut.
    context_field: str | None = None
    max_new_tokens: int = 64
    description: str = ""
    # What training teaches the model to write, when more than the target: pubmedqa-explain's answer word followed by
    # the abstract's conclusion. Scoring still reads the label word (or the references) alone.
    train_target: Callable[[Example], str] | None = None

    def template(self, index: int) -> Template:
        if not 0 <= index < len(self.templates):
            raise ValueError(f"task '{self.name}' has {len(self.templates)} templates; index {index} is out of range")
        return self.templates[index]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a malformed line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise data_error(path, lineno, None, f"malformed JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise data_error(path, lineno, None, "expected a JSON object")
            yield lineno, obj


def read_json(path: Path) -> Any:
    """Load a whole JSON file; a malformed file is an error naming file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise data_error(path, err.lineno, None, f"malformed JSON ({err.msg})") from None


def require_text(path: Path, line: int | None, obj: dict, key: str) -> str:
    """The non-empty string at `obj[key]`, or an error naming file, line and field."""
    if key not in obj:
        raise data_error(path, line, key, "missing")
    value = obj[key]
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        raise data_error(path, line, key, "empty text")
    return value
