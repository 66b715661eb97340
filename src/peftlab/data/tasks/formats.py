"""Reading a user's own files: records from JSONL, JSON, CSV or Parquet, and the alpaca and chat formats.

JSONL, JSON and CSV are read by peftlab's own readers, which name the line of a malformed record; Parquet goes
through Hugging Face `datasets` (offline: local files only). A CSV cell is text as written: a type-guessing reader
would turn the id `007` into 7, and the words `NA`, `None` or `null` into a missing value. Every reader returns
`(row number, record)` pairs, so an error names the file, the row and the field the way the built-in tasks do.

- **alpaca**: `instruction`, an optional `input` (the context: truncation shortens it, never the instruction) and
  `output`, the target. The fields LLaMA-Factory, Axolotl and TRL take.
- **chat**: `messages`, a list of `{role, content}`; the last turn is the assistant's answer (the target) and the
  turns before it are the prompt, rendered through the model's chat template.

When the outputs of the training file are a few short labels, the task is classification (label scoring, accuracy
and macro-F1), else generation (ROUGE); `infer_labels` decides, and `data.labels` overrides it. Labels that differ
only in case, space or Unicode form are one label (`label_key`): "Yes" and "yes" would otherwise be two classes, and
accuracy and macro-F1 would count a right answer wrong. Every row's label is then read as the label set's spelling
(`match_label`), in every split.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
import unicodedata
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
    if path.suffix == ".csv":
        return _read_csv(path)
    return _read_parquet(path)


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """CSV records numbered by the line they start on (the header is line 1), every cell as the text it holds.

    An empty cell is read as null, the closest CSV has to a missing value, so that a required field names it.
    """
    records = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            start = 2
            for row in reader:
                if None in row:  # more cells than the header has columns: which column is which is a guess
                    raise data_error(path, start, None, f"{len(row) - 1 + len(row[None])} cells, but the header "
                                     f"names {len(reader.fieldnames or [])} columns")
                records.append((start, {k: (v if v != "" else None) for k, v in row.items()}))
                start = reader.line_num + 1
    except (csv.Error, UnicodeDecodeError) as err:
        raise PeftlabError(f"{path}: cannot read this CSV file ({err})") from None
    return records


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    """Parquet through `datasets`: its columns carry their own types, so nothing is guessed."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    cache = tempfile.mkdtemp(prefix="peftlab-datasets-")  # nothing left in the user's datasets cache
    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache,
                                      keep_in_memory=True)
    except Exception as err:  # pyarrow raises many types; all mean the file cannot be read
        raise PeftlabError(f"{path}: cannot read this PARQUET file ({str(err).splitlines()[0]})") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return [(i, dict(row)) for i, row in enumerate(table, start=1)]


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
    """What makes two labels one label: neither case, nor space (around or between words), nor Unicode form counts.

    NFKC reads a decomposed "é" (e + a combining accent, as macOS file names and some exports write it) as the
    composed one, and full-width "ｙｅｓ" as "yes": each pair looks the same, and would otherwise be two classes.
    """
    return " ".join(unicodedata.normalize("NFKC", label).casefold().split())


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
