"""Multi-task mixtures (FLAN style): one run trained on several tasks, each with several instruction phrasings.

    data:
      mixture:
        - {task: pubmedqa, weight: 1, templates: [0, 1, 2]}
        - {task: dialogsum, weight: 2, templates: [0, 2]}

or the shorthand `data.task: mix:pubmedqa,dialogsum` (equal weights, every phrasing). The training set has as many
examples as the tasks' train splits together; task i gets a `weight_i / sum(weights)` share of them, drawn by
cycling through its shuffled train split, so a small task is repeated and a large one subsampled. Each training
example is phrased with a template drawn by a seeded RNG from its entry's list. Val and test are scored per task
with the entry's first template; metric keys carry the task, e.g. `test_pubmedqa_accuracy`, `test_dialogsum_rouge1`.
Per-epoch validation (best checkpoint, early stopping, sweep pruning) uses the first entry: list the task that
matters most first.

A single-task run goes through the same code as a one-part mixture (`single_part`), so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as section

from peftlab.core.config import DataConfig, from_dict
from peftlab.core.errors import PeftlabError
from peftlab.core.schema import FORBID
from peftlab.data.splits import load_splits
from peftlab.data.tasks import Example, Task, get_task


@section(config=FORBID)
class MixtureEntry:
    """One task of a mixture: its data file (default: the task's own), sampling weight and phrasings."""

    task: StrictStr
    path: StrictStr | None = None
    weight: StrictFloat = 1.0
    templates: list[StrictInt] = field(default_factory=list)


@dataclass
class Part:
    """One task of a run with its splits. A single-task run is one part whose `key` is empty."""

    entry: MixtureEntry
    task: Task
    key: str  # the task as it appears in metric keys; "" for a single-task run
    splits: dict[str, list[Example]]

    def metric(self, split: str, name: str) -> str:
        """The metrics.json key of a metric: `test_accuracy` alone, `test_pubmedqa_accuracy` in a mixture."""
        return f"{split}_{self.key}_{name}" if self.key else f"{split}_{name}"


def is_mixture(data: DataConfig) -> bool:
    """Whether the run trains on a mixture of tasks (`data.mixture` or `data.task: mix:a,b`)."""
    return bool(data.mixture) or data.task.startswith("mix:")


def single_part(data: DataConfig, task: Task, splits: dict[str, list[Example]]) -> Part:
    """A single-task run as a part: its one template, unprefixed metric keys."""
    return Part(MixtureEntry(task.name, data.path, templates=[data.template]), task, "", splits)


def parse_mixture(data: DataConfig) -> list[MixtureEntry]:
    """The mixture entries of `data.mixture`, or of the `mix:a,b` shorthand, checked."""
    raw = data.mixture
    if not raw and data.task.startswith("mix:"):
        raw = [{"task": name.strip()} for name in data.task[4:].split(",") if name.strip()]
    entries = [from_dict(MixtureEntry, r, f"data.mixture[{i}]") for i, r in enumerate(raw)]
    if len(entries) < 2:
        raise PeftlabError("a mixture needs at least two tasks (data.mixture or data.task: mix:a,b)")
    for i, e in enumerate(entries):
        n = len(get_task(e.task).templates)
        e.templates = e.templates or list(range(n))
        if e.weight <= 0 or any(not 0 <= t < n for t in e.templates):
            raise PeftlabError(f"data.mixture[{i}] ({e.task}): weight must be > 0 and templates within 0..{n - 1}")
    return entries


def load_parts(data: DataConfig, entries: list[MixtureEntry], val_in_train: bool = False) -> list[Part]:
    """Each task's splits, drawn with the run's split settings and limits (`val_in_train`: see `load_splits`)."""
    parts = []
    for e in entries:
        task = get_task(e.task)
        own = dataclasses.replace(data, task=e.task, path=e.path, mixture=[])
        parts.append(Part(e, task, metric_key(task.name), load_splits(own, task, val_in_train)))
    keys = [p.key for p in parts]
    if len(set(keys)) != len(keys):
        raise PeftlabError(f"data.mixture lists a task twice: {keys}")
    return parts


def metric_key(name: str) -> str:
    """A task name as it appears in metric keys: `pubmedqa-binary` -> `pubmedqa_binary`."""
    return re.sub(r"[^0-9A-Za-z]+", "_", Path(name).stem if name.endswith((".yaml", ".yml")) else name).strip("_")
