"""What a task is: how to read its file, how to phrase its prompt, and how to score it.

A task is data, not a class hierarchy: a `Task` value holds its loader, its instruction phrasings and its metric.
Adding a task is one small module that builds a `Task` and registers it (see `tasks/__init__.py`).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftlab.errors import data_error

TaskKind = Literal["classification", "generation"]


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


Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def split_examples(
    examples: Sequence[Example],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stratify: bool = True,
) -> dict[str, list[Example]]:
    """Deterministic, seeded, stratified train/val/test split.

    Examples the file already assigns to a split keep it. The rest are split per label (for classification) so
    every split keeps the class balance: PubMedQA's "maybe" is only 11% and a random 50-item split can miss it.
    """
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    unassigned = []
    for ex in examples:
        (out[ex.split] if ex.split in out else unassigned).append(ex)
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in unassigned:
        groups[ex.target if stratify else ""].append(ex)
    rng = random.Random(seed)
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda e: e.id)
        rng.shuffle(group)
        n_train = round(len(group) * fractions[0])
        n_val = round(len(group) * fractions[1])
        out["train"] += group[:n_train]
        out["val"] += group[n_train : n_train + n_val]
        out["test"] += group[n_train + n_val :]
    for split in SPLITS:
        rng.shuffle(out[split])  # interleave the classes again
    return out


def kfold_examples(examples: Sequence[Example], k: int, fold: int, seed: int = 0) -> dict[str, list[Example]]:
    """Stratified k-fold: fold `fold` is the test split, one further fold is val, the rest train."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in sorted(examples, key=lambda e: e.id):
        groups[ex.target].append(ex)
    rng = random.Random(seed)
    folds: list[list[Example]] = [[] for _ in range(k)]
    offset = 0
    for key in sorted(groups):
        group = groups[key]
        rng.shuffle(group)
        for i, ex in enumerate(group):
            folds[(i + offset) % k].append(ex)
        offset += len(group)
    val_fold = (fold + 1) % k
    train = [ex for i, f in enumerate(folds) if i not in (fold, val_fold) for ex in f]
    return {"train": train, "val": folds[val_fold], "test": folds[fold]}
