"""Training targets other than the gold labels: a file of outputs keyed by example id (a teacher's, or a
hosted model's), read and checked so that every training example has one.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from peftlab.core.config import DataConfig
from peftlab.core.errors import PeftlabError, data_error
from peftlab.data.tasks import Example, Task
from peftlab.data.tasks.base import not_utf8, read_jsonl
from peftlab.data.tasks.formats import match_label

ID_KEYS = ("id", "example_id")
OUTPUT_KEYS = ("output", "prediction", "text")


def read_outputs(path: Path) -> dict[str, str]:
    """Teacher outputs keyed by id, from JSONL or CSV with an id column and an output/prediction/text column."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"{path}: no such teacher-output file")
    if path.suffix == ".csv":
        try:
            with path.open(encoding="utf-8-sig", newline="") as f:
                rows = list(enumerate(csv.DictReader(f), start=2))
        except UnicodeDecodeError:
            raise not_utf8(path) from None
    else:
        rows = read_jsonl(path)
    outputs: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, row in rows:
        id_key = next((k for k in ID_KEYS if k in row), None)
        out_key = next((k for k in OUTPUT_KEYS if k in row), None)
        if id_key is None:
            raise data_error(path, lineno, "id", "missing")
        if out_key is None or not str(row[out_key]).strip():
            raise data_error(path, lineno, out_key or "output", "missing or empty text")
        key, output = str(row[id_key]), str(row[out_key]).strip()
        # Two different outputs for one id: keeping either would train that example on a guess.
        if outputs.get(key, output) != output:
            raise data_error(path, lineno, id_key, f"id {key!r} has another output on line {lines[key]}")
        outputs[key], lines[key] = output, lines.get(key, lineno)
    return outputs


def resolve_targets(data: DataConfig, output_dir: str | Path, task: Task, examples: list[Example]) -> list[Example]:
    """Replace each training example's target by the teacher's output when `data.target` names a file
    (`output_dir`: where `data.target: teacher` finds the study's teacher.jsonl)."""
    if data.target == "gold":
        return examples
    outputs = read_outputs(teacher_file(data, output_dir))
    _check_unique_ids(examples)
    missing = [ex.id for ex in examples if ex.id not in outputs]
    if missing:
        raise PeftlabError(
            f"{data.target}: no teacher output for {len(missing)} training example(s), e.g. id '{missing[0]}'"
        )
    if task.kind == "classification":  # "Yes" is the label `yes`, as in the data files (`match_label`)
        bad = [(ex.id, outputs[ex.id]) for ex in examples if match_label(outputs[ex.id], task.labels) is None]
        if bad:
            raise PeftlabError(f"{data.target}: id {bad[0][0]!r}: unknown label {bad[0][1]!r}")
        outputs = {ex.id: match_label(outputs[ex.id], task.labels) for ex in examples}
    return [dataclasses.replace(ex, target=outputs[ex.id]) for ex in examples]


def _check_unique_ids(examples: list[Example]) -> None:
    """Outputs are matched to examples by id: two different training rows with one id would both get the output
    written for one of them."""
    seen: dict[str, Example] = {}
    for ex in examples:
        other = seen.setdefault(ex.id, ex)
        if other is not ex and (other.inputs, other.messages) != (ex.inputs, ex.messages):
            raise PeftlabError(f"{ex.source or 'data'}: id {ex.id!r} is also the id of {other.source or 'another row'}"
                               f"; data.target matches outputs to rows by id, so ids must be unique")


def teacher_file(data: DataConfig, output_dir: str | Path) -> Path:
    """The outputs file `data.target` points at: `teacher` means `<output_dir>/teacher.jsonl` (a study's teacher)."""
    if data.target != "teacher":
        return Path(data.target)
    path = Path(output_dir) / "teacher.jsonl"
    if not path.is_file():
        raise PeftlabError(
            f"data.target: teacher needs {path}; give the study a `teachers:` list (see docs/experiments.md) "
            f"or write it with `peftlab distill --out {path}`"
        )
    return path
