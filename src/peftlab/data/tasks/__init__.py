"""The task registry: a name maps to a function that builds the `Task`.

Adding a task means one module with a `make_task()` and one line here. A path to a `.yaml` file names a custom task.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from peftlab.core.errors import PeftlabError, unknown_name
from peftlab.data.tasks import custom, dialogsum, pubmedqa, scienceqa
from peftlab.data.tasks.base import Example, Task, Template

TASKS: dict[str, Callable[[], Task]] = {
    "pubmedqa": pubmedqa.make_task,
    "pubmedqa-binary": partial(pubmedqa.make_task, "pubmedqa-binary", ("yes", "no")),
    "pubmedqa-explain": partial(pubmedqa.make_task, "pubmedqa-explain", explain=True),
    "dialogsum": dialogsum.make_task,
    "scienceqa": scienceqa.make_task,
    "scienceqa-explain": partial(scienceqa.make_task, "scienceqa-explain", explain=True),
    "alpaca": partial(custom.make_format_task, "alpaca"),
    "chat": partial(custom.make_format_task, "chat"),
}

# Default data files shipped in the repo's data/ folder.
DEFAULT_DATA: dict[str, str] = {
    "pubmedqa": "data/pubmedqa/pqal_trainval.json",
    "pubmedqa-binary": "data/pubmedqa/pqal_trainval.json",
    "pubmedqa-explain": "data/pubmedqa/pqal_trainval.json",
    "dialogsum": "data/dialogsum/dev.jsonl",
    "scienceqa": "data/scienceqa-synthetic/problems.json",  # synthetic: generated shapes, not ScienceQA's questions
    "scienceqa-explain": "data/scienceqa-synthetic/problems.json",
}


def task_for(data) -> Task:
    """The task a run's `data` config names, with its label set when `data.labels` gives one (alpaca, chat)."""
    task = get_task(data.task)
    if data.labels is not None:
        if task.relabel is None:
            raise PeftlabError(f"data.labels applies to the alpaca and chat formats, not to task '{task.name}'")
        task = task.relabel(tuple(data.labels))
    return task


def get_task(name: str) -> Task:
    """Build a registered task by name, or a custom task from a YAML path."""
    if name.endswith((".yaml", ".yml")):
        return custom.make_task(Path(name))
    if name not in TASKS:
        raise unknown_name("task", name, [*TASKS, "<path/to/task.yaml>"])
    return TASKS[name]()


__all__ = [
    "DEFAULT_DATA",
    "TASKS",
    "Example",
    "Task",
    "Template",
    "get_task",
    "task_for",
]
