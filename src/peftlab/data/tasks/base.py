"""What a task is: how to read its file, how to phrase its prompt, and how to score it.

A task is data, not a class hierarchy: a `Task` value holds its loader, its instruction phrasings and its metric.
Adding a task is one small module that builds a `Task` and registers it (see `tasks/__init__.py`).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftlab.core.errors import PeftlabError, data_error

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
    # A chat example's prompt as turns ({role, content}), rendered through the chat template; None for the rest.
    messages: tuple[dict[str, str], ...] | None = None
    # Where the row is ("data.jsonl:12"), so an error about its length can name it; None for a row from elsewhere.
    source: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Template:
    """One instruction phrasing. `text` is a format string over the example's input names and `{instruction}`."""

    instruction: str
    text: str

    def render(self, inputs: dict[str, str]) -> str:
        # An input field may itself be called `instruction` (alpaca-style data): the example's own text wins.
        return self.text.format_map({"instruction": self.instruction, **inputs})


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
    # Rows without targets, for `peftlab predict` (None: the task cannot read unlabelled rows).
    load_unlabelled: Callable[[Path], list[Example]] | None = None
    # Open formats (alpaca, chat) take their label set from the data: the same task with those labels.
    relabel: Callable[[tuple[str, ...]], Task] | None = None
    # Open formats: one raw record (as the file holds it, without a target) as an example, for a served request.
    read_record: Callable[[dict], Example] | None = None

    def template(self, index: int) -> Template:
        if not 0 <= index < len(self.templates):
            raise ValueError(f"task '{self.name}' has {len(self.templates)} templates; index {index} is out of range")
        return self.templates[index]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a malformed line is an error naming file and line."""
    # utf-8-sig: a byte-order mark, as many Windows editors write one, is read past rather than refused.
    try:
        with open(path, encoding="utf-8-sig") as f:
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
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def read_json(path: Path) -> Any:
    """Load a whole JSON file; a malformed file is an error naming file and line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise data_error(path, err.lineno, None, f"malformed JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def not_utf8(path: Path) -> PeftlabError:
    """The error for a data file that is not UTF-8 text (a binary file, or text saved as Latin-1 or UTF-16),
    naming the line of its first bad byte. Read again only on this error, as bytes, to find that line."""
    data = Path(path).read_bytes()
    body = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        line = body[: err.start].count(b"\n") + 1
        return data_error(path, line, None, f"not UTF-8 text (byte 0x{body[err.start]:02x}); save the file as UTF-8")
    return data_error(path, None, None, "not UTF-8 text; save the file as UTF-8")


def require_text(path: Path, line: int | None, obj: dict, key: str, name: str | None = None) -> str:
    """The non-empty string at `obj[key]`, or an error naming file, line and field (`name`, default `key`).

    A list of strings (PubMedQA's abstract paragraphs) is joined with spaces. Anything else that is not text (a
    number, an object, null, a list holding such values) is refused rather than turned into its Python repr.
    """
    name = name or key
    if key not in obj:
        raise data_error(path, line, name, "missing")
    value = obj[key]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = " ".join(v.strip() for v in value)
    if not isinstance(value, str):
        raise data_error(path, line, name, f"expected text, got {json_kind(value)}")
    if not value.strip():
        raise data_error(path, line, name, "empty text")
    return value


def optional_id(path: Path, line: int | None, obj: dict, keys: Sequence[str], default: str) -> str:
    """A row's id from the first of `keys` it has (text or an integer), else `default`."""
    for key in keys:
        value = obj.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise data_error(path, line, key, f"expected text or an integer id, got {json_kind(value)}")
        return str(value)
    return default


def json_kind(value: Any) -> str:
    """How a non-text JSON value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, list):
        return "an empty list" if not value else "a list of non-text values"
    return "an object"


def require_split(path: Path, line: int | None, obj: dict, name: str = "split") -> str | None:
    """A row's own `split` (train, val or test), or None when it has none; any other value is an error.

    A silently ignored "Test" would be re-split, and some test rows would then land in training.
    """
    split = obj.get("split")
    if split is None:
        return None
    if split not in SPLITS:
        raise data_error(path, line, name, f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return split
