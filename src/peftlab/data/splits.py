"""Train/val/test splits: seeded and stratified, k-fold for cross-validation, with the run's limits.

Rows that carry their own `split` keep it.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from peftlab.core.config import DataConfig
from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import DEFAULT_DATA, Example, Task
from peftlab.data.tasks.base import SPLITS
from peftlab.data.tasks.formats import infer_labels, merged_labels


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


def read_examples(data: DataConfig, task: Task) -> list[Example]:
    """Every example of the run's data file, in file order; a missing or empty file is an error naming it."""
    path = data.path or DEFAULT_DATA.get(task.name)
    if path is None:
        raise PeftlabError(f"task '{task.name}' has no data file of its own: set data.path, or data.train/data.test")
    return read_file(task, Path(path))


def read_file(task: Task, path: Path, labelled: bool = True) -> list[Example]:
    """A file's examples in file order (`labelled=False`: rows to predict, without targets)."""
    if not path.is_file():
        raise PeftlabError(f"{path}: no such data file (set data.path)")
    if labelled:
        examples = task.load(path)
    elif task.load_unlabelled is None:
        raise PeftlabError(f"task '{task.name}' cannot read rows without targets")
    else:
        examples = task.load_unlabelled(path)
    if not examples:
        raise PeftlabError(f"{path}: no examples in the file")
    return examples


def split_files(data: DataConfig, task: Task) -> dict[str, list[Example]]:
    """Splits from `data.train`, `data.val` and `data.test`. A split without a file of its own is carved from the
    training file, seeded and stratified, in the proportions `data.split` gives it against train."""
    if data.path:
        raise PeftlabError("set data.path or data.train/data.val/data.test, not both")
    if data.fold is not None:
        raise PeftlabError("data.fold makes its own test folds from one file: use data.path, not data.train/test")
    files = (("train", data.train), ("val", data.val), ("test", data.test))
    given = {s: read_file(task, Path(f)) for s, f in files if f}
    missing = [s for s in ("val", "test") if s not in given]
    if "train" not in given or not missing:
        return {s: given.get(s, []) for s in SPLITS}
    # The rows' own `split` field belongs to the one-file layout; here each file is its split.
    train = [dataclasses.replace(ex, split=None) for ex in given["train"]]
    shares = [data.split[0], *(data.split[SPLITS.index(s)] if s in missing else 0.0 for s in ("val", "test"))]
    total = sum(shares)
    carved = split_examples(train, tuple(x / total for x in shares), data.seed, stratify=task.kind == "classification")
    # A split that has a file of its own takes nothing from train: whatever rounding put there stays in train.
    kept = carved["train"] + [ex for s in ("val", "test") if s in given for ex in carved[s]]
    return {"train": kept, **{s: given.get(s, carved[s]) for s in ("val", "test")}}


def in_file_order(examples: Sequence[Example], file_order: Sequence[Example]) -> list[Example]:
    """`examples` sorted as they stand in the file (`file_order`: `read_examples`), matched by id."""
    position: dict[str, int] = {}
    for i, ex in enumerate(file_order):
        position.setdefault(ex.id, i)
    return sorted(examples, key=lambda ex: position.get(ex.id, len(position)))


def load_splits(data: DataConfig, task: Task, val_in_train: bool = False) -> dict[str, list[Example]]:
    """The task's examples, split deterministically (or by k-fold), with the configured limits applied.

    `val_in_train`: a k-fold val fold joins train. A method that does not train selects nothing on val, so its fold
    is better spent as few-shot demos; the caller, which knows the method, decides.
    """
    if data.train or data.val or data.test:
        splits = split_files(data, task)
    elif data.fold is not None:
        examples = read_examples(data, task)
        splits = kfold_examples(examples, data.folds, data.fold, data.seed)
        if val_in_train:
            splits = {"train": splits["train"] + splits["val"], "val": [], "test": splits["test"]}
    else:
        examples = read_examples(data, task)
        splits = split_examples(examples, tuple(data.split), data.seed, stratify=task.kind == "classification")
    if data.limit_train:
        splits["train"] = splits["train"][: data.limit_train]
    if data.limit_eval:
        splits["val"] = splits["val"][: data.limit_eval]
        splits["test"] = splits["test"][: data.limit_eval]
    return splits


def data_labels(data: DataConfig, task: Task) -> tuple[str, ...]:
    """The label set of an open-format task (alpaca, chat): `data.labels` when set, else what the training file's
    outputs form (`infer_labels`: a few short labels, each seen twice), else () for free text.

    Spellings that differ only in case or space become one label, with a warning on stderr that names them.
    """
    if data.labels is not None or task.relabel is None:
        return tuple(data.labels or task.labels)
    source = data.train or data.path
    if not source:
        return ()
    examples = read_file(task, Path(source))
    labels = infer_labels(examples)
    merged = merged_labels(examples) if labels else None
    if merged:
        print(f"warning: {source}: labels differing only in case/space were merged: {merged}", file=sys.stderr)
    return labels
