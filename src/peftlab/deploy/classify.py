"""Serving classifier runs: a linear head (and its text heads) on the server's own base model.

`peftlab serve --adapter NAME=RUN` with a `linear-head` run puts the head beside the peft adapters. The head reads
the frozen base's states, so it shares the one base in memory; a run trained on another base is refused. A request
is an example's input fields, as in the run's data file; it is encoded with the run's template and max_length, and
answered with the label and the class probabilities the run's `peftlab eval` would give.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from peftlab.core.errors import PeftlabError
from peftlab.core.result import run_config
from peftlab.data.tasks import Example, Task, task_for
from peftlab.evaluate.split_scoring import predict
from peftlab.methods.head import LinearHead, load_head
from peftlab.models.hf_folder import LoadedModel
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import PromptFormat


def is_head_run(path: Path) -> bool:
    """Whether a folder is a finished linear-head run."""
    return (Path(path) / "head" / "head.json").is_file() and (Path(path) / "config.yaml").is_file()


@dataclass
class ServedHead:
    """One classifier run on the shared base: its head, task (labels, template) and max_length."""

    head: LinearHead
    task: Task
    template: int
    max_length: int

    def example(self, fields: dict) -> Example:
        """The request's input fields as an example; a missing, non-text or unknown field is a ValueError naming it.

        An unknown field is refused, not dropped: alpaca's `inputs` for `input` would otherwise be classified
        without its context, and answer with a label for another question.
        """
        names = self.fields()
        unknown = [n for n in fields if n not in names]
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; this classifier reads {', '.join(names)}")
        if self.task.read_record is not None:  # alpaca and chat take a record as their files hold it
            return self.task.read_record(fields)
        missing = [n for n in names if not isinstance(fields.get(n), str) or not fields[n].strip()]
        if missing:
            raise ValueError(f"inputs needs text fields {', '.join(names)}; missing or empty: {', '.join(missing)}")
        return Example("request", {n: fields[n].strip() for n in names}, "", ())

    def fields(self) -> list[str]:
        """The input fields a request may send: the template's, or an alpaca or chat record's."""
        if self.task.read_record is not None:
            return ["instruction", "input"] if "instruction" in self.task.templates[0].text else ["messages"]
        return _template_fields(self.task, self.template)

    def single_field(self) -> str | None:
        """The one input a plain completion prompt fills, when the task has just one (or alpaca's instruction)."""
        if self.task.read_record is not None:
            return "instruction" if "instruction" in self.task.templates[0].text else None
        names = _template_fields(self.task, self.template)
        return names[0] if len(names) == 1 else None


def _template_fields(task: Task, template: int) -> list[str]:
    import string

    text = task.template(template).text
    return [f for _, f, _, _ in string.Formatter().parse(text) if f and f != "instruction"]


class HeadPool:
    """The served classifier runs, scored one request at a time (the base is shared with generation)."""

    def __init__(self, loaded: LoadedModel, fmt: PromptFormat, runs: dict[str, Path], lock: threading.Lock,
                 plain_base: Callable[[], AbstractContextManager]):
        """`lock`: the one the generation pool holds; `plain_base()`: a context in which the shared base runs
        without any LoRA layer that serving other adapters injected into it (the head was fitted on the bare base).
        """
        self.fmt, self.lock, self.plain_base = fmt, lock, plain_base
        self.heads = {name: _load(loaded, name, path) for name, path in runs.items()}

    def classify(self, name: str, fields: dict) -> tuple[str, dict[str, float]]:
        """(label, probabilities over the run's labels) for one request's input fields."""
        served = self.heads[name]
        example = served.example(fields)
        item = encode(served.task, example, self.fmt, served.max_length, served.template)
        with self.lock, self.plain_base():
            answer = predict(served.head, self.fmt, served.task, [example], [item], progress=False)
        return answer.texts[0], answer.probabilities(served.task.labels)[0]


def _load(loaded: LoadedModel, name: str, run_dir: Path) -> ServedHead:
    cfg = run_config(run_dir)
    if Path(cfg.model.name).resolve() != Path(loaded.name).resolve() and cfg.model.name != loaded.name:
        raise PeftlabError(f"--adapter {name}={run_dir}: the head reads base '{cfg.model.name}', "
                           f"but this server's base is '{loaded.name}'")
    task = task_for(cfg.data)
    return ServedHead(load_head(loaded, task, cfg.method, Path(run_dir)), task, cfg.data.template,
                      cfg.data.max_length)
