"""Reading a user's own files: records from JSONL, JSON, CSV or Parquet, and the alpaca and chat formats.

JSONL and JSON are read by peftlab's own readers, which name the line of a malformed record; CSV and Parquet go
through Hugging Face `datasets` (offline: local files only). Every reader returns `(row number, record)` pairs, so
an error names the file, the row and the field the way the built-in tasks do.

- **alpaca**: `instruction`, an optional `input` (the context: truncation shortens it, never the instruction) and
  `output`, the target. The fields LLaMA-Factory, Axolotl and TRL take.
- **chat**: `messages`, a list of `{role, content}`; the last turn is the assistant's answer (the target) and the
  turns before it are the prompt, rendered through the model's chat template.

When the outputs of the training file are a few short labels, the task is classification (label scoring, accuracy
and macro-F1), else generation (ROUGE); `infer_labels` decides, and `data.labels` overrides it. Labels that differ
only in case or surrounding space are one label (`label_key`): "Yes" and "yes" would otherwise be two classes, and
accuracy and macro-F1 would count a right answer wrong. Every row's label is then read as the label set's spelling
(`match_label`), in every split.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from peftlab.core.errors import PeftlabError, data_error
from peftlab.data.tasks.base import Example, json_kind, read_json, read_jsonl, require_split, require_text

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
MAX_LABELS = 20  # more distinct outputs than this is free text, not a label set
MAX_LABEL_WORDS = 4


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(row number, record) for each record of a JSONL, JSON (a list of objects), CSV or Parquet file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise PeftlabError(f"{path}: unknown file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")
    if path.suffix == ".jsonl":
        return list(read_jsonl(path))
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise data_error(path, None, None, "expected a JSON list of objects (one per example)")
        return list(enumerate(data, start=1))
    return _read_with_datasets(path)


def _read_with_datasets(path: Path) -> list[tuple[int, dict]]:
    """CSV and Parquet through `datasets`; CSV rows are numbered by their line (the header is line 1)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    kind = "csv" if path.suffix == ".csv" else "parquet"
    options = {"encoding": "utf-8-sig"} if kind == "csv" else {}
    cache = tempfile.mkdtemp(prefix="peftlab-datasets-")  # nothing left in the user's datasets cache
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache,
                                      keep_in_memory=True, **options)
    except Exception as err:  # pyarrow and pandas raise many types; all mean the file cannot be read
        raise PeftlabError(f"{path}: cannot read this {kind.upper()} file ({str(err).splitlines()[0]})") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    first = 2 if kind == "csv" else 1
    return [(i, dict(row)) for i, row in enumerate(table, start=first)]


def optional_text(path: Path, line: int, obj: dict, key: str) -> str:
    """The text at `obj[key]`, or "" when it is missing, null or empty; any other value is an error."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise data_error(path, line, key, f"expected text, got {json_kind(value)}")
    return value.strip()


def alpaca_example(path: Path, line: int, obj: dict, labelled: bool = True) -> Example:
    """One alpaca record. The input joins the prompt after a blank line, where truncation may shorten it."""
    instruction = require_text(path, line, obj, "instruction").strip()
    context = optional_text(path, line, obj, "input")
    target = require_text(path, line, obj, "output").strip() if labelled else optional_text(path, line, obj, "output")
    return Example(
        id=_row_id(path, line, obj),
        inputs={"instruction": instruction, "input": f"\n\n{context}" if context else ""},
        target=target,
        references=(target,) if target else (),
        split=require_split(path, line, obj),
        source=f"{path}:{line}",
    )


def chat_example(path: Path, line: int, obj: dict, labelled: bool = True) -> Example:
    """One chat record: the last turn must be the assistant's when labelled; the turns before it are the prompt."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise data_error(path, line, "messages", "expected a non-empty list of {role, content} turns")
    turns = []
    for i, turn in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise data_error(path, line, where, f"expected {{role, content}} with role one of {', '.join(ROLES)}")
        content = require_text(path, line, turn, "content", f"{where}.content")
        turns.append({"role": turn["role"], "content": content.strip()})
    target = ""
    if turns[-1]["role"] == "assistant" and (labelled or len(turns) > 1):
        target = turns.pop()["content"]
    elif labelled:
        raise data_error(path, line, "messages", "the last turn must be the assistant's answer (the target)")
    if not turns or turns[-1]["role"] == "assistant":
        raise data_error(path, line, "messages", "the prompt must end with a user turn")
    transcript = "\n".join(f"{t['role']}: {t['content']}" for t in turns)
    return Example(
        id=_row_id(path, line, obj),
        inputs={"conversation": transcript},
        target=target,
        references=(target,) if target else (),
        split=require_split(path, line, obj),
        messages=tuple(turns),
        source=f"{path}:{line}",
    )


def _row_id(path: Path, line: int, obj: dict) -> str:
    value = obj.get("id")
    if value is None or value == "":
        return f"row{line}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise data_error(path, line, "id", f"expected text or an integer id, got {json_kind(value)}")
    return str(value)


def label_key(label: str) -> str:
    """What makes two labels one label: neither case nor surrounding space counts."""
    return label.strip().casefold()


def match_label(target: str, labels: Sequence[str]) -> str | None:
    """The label of `labels` that `target` is: the same text, else the one label equal up to case and space."""
    if target in labels:
        return target
    same = [label for label in labels if label_key(label) == label_key(target)]
    return same[0] if len(same) == 1 else None


def _spellings(examples: Sequence[Example]) -> list[Counter]:
    """The targets grouped by `label_key`: each group's spellings with their counts."""
    groups: dict[str, Counter] = {}
    for ex in examples:
        groups.setdefault(label_key(ex.target), Counter())[ex.target] += 1
    return list(groups.values())


def _canonical(spellings: Counter) -> str:
    """A group's label: its most frequent spelling; a tie goes to the lower-case one, then to the first in order."""
    return min(spellings, key=lambda s: (-spellings[s], s != s.lower(), s))


def infer_labels(examples: Sequence[Example]) -> tuple[str, ...]:
    """The label set when the targets are a few short labels, each seen at least twice; else () (generation).

    Spellings that differ only in case or space count as one label (`merged_labels` says which were merged).
    """
    groups = _spellings(examples)
    if not 2 <= len(groups) <= MAX_LABELS or min(sum(g.values()) for g in groups) < 2:
        return ()
    labels = [_canonical(g) for g in groups]
    if any(len(t.split(maxsplit=MAX_LABEL_WORDS)) > MAX_LABEL_WORDS for t in labels):  # a huge text: few splits
        return ()
    return tuple(sorted(labels))


def merged_labels(examples: Sequence[Example]) -> str | None:
    """The spellings `infer_labels` merged, for a warning: "'Yes' (3), 'yes' (5) -> 'yes'"; None when none were."""
    merged = sorted((g for g in _spellings(examples) if len(g) > 1), key=_canonical)
    if not merged:
        return None
    return "; ".join(", ".join(f"{s!r} ({n})" for s, n in sorted(g.items())) + f" -> {_canonical(g)!r}"
                     for g in merged)
