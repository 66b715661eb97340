"""Study files: a shared `base` run config, a list of `runs`, optional `grids` crossed into runs, and the sections
of the experiments built on studies (`sweep`, `tune`, `repeats`, `metric`, teachers).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, StrictBool, StrictStr, with_config
from pydantic.dataclasses import dataclass as section
from typing_extensions import TypedDict  # pydantic reads typing's own only from Python 3.12

from peftlab.core.config import set_dotted
from peftlab.core.errors import PeftlabError
from peftlab.core.schema import FORBID, checked, empty_is_default, setting
from peftlab.core.yamlio import describe, read_yaml

RUN = "a run config, e.g. {method: {name: lora}}"


@with_config(ConfigDict(extra="allow"))
class RunEntry(TypedDict, total=False):
    """A `runs:` entry: a run config on top of base (its keys are checked when the run resolves), whose name is
    text when given (default: its method's name)."""

    name: StrictStr | None


@section(config=FORBID)
class Grid:
    """A `grids:` entry: every combination of its `params` is a run named `<name>-<key><value>-...`."""

    name: StrictStr = setting(help="the grid's name, which its runs' names start with", note="the grid's name")
    params: dict[str, list] = setting({}, "config.key: [values, ...]; each combination of values is one run")
    config: dict = setting({}, "the run config the grid's runs start from, on top of base", RUN)

    _empty = empty_is_default("params", "config")


@section(config=FORBID)
class Study:
    """A study file. The sections of the experiments built on studies are checked by their own models where they
    are used: `tune` (`recipes.tuning.TuneSpec`), `repeats` (`recipes.repeats.Repeats`), `executor`
    (`recipes.executors.ExecutorSpec`), `sweep` (`recipes.sweep.SweepSpec`) and `teachers`
    (`experiments.distill.TeacherSpec`)."""

    name: StrictStr | None = setting(None, "the study's name, its folder under output_dir; default: the file's stem")
    output_dir: StrictStr = setting("runs", "where the study folder is written")
    base: dict = setting({}, "the run config every run starts from", "the run config every run starts from")
    runs: list[RunEntry] = setting([], "the runs, each a run config on top of base, named by name or method.name", RUN)
    grids: list[Grid] = setting([], "grids whose params are crossed into more runs")
    metric: StrictStr | None = setting(None, "the metric a decision study chooses and ranks by; default: the "
                                             "task's primary metric")
    select_teacher: StrictBool = setting(False, "rank the teachers on val and distill with the best")
    teachers: Any = setting(None, "distillation teachers, each {name, model, adapter?, template?}")
    sweep: Any = setting(None, "`peftlab sweep`: trials, seed, pruner, startup_trials, direction, space")
    tune: Any = setting(None, "choose each method on val: trials, seed, pruner, startup_trials, space, methods, "
                              "select, metric")
    repeats: Any = setting(None, "rerun each chosen config: {seeds: [0, 1, 2]} or {folds: 5}, race?, alpha?")
    executor: Any = setting(None, "where the runs go: {kind: local or ray, workers, address}")

    _empty = empty_is_default("output_dir", "base", "runs", "grids", "select_teacher")

    def folder(self, path: Path) -> Path:
        """The study folder: output_dir/name, the name defaulting to the study file's stem (`name:` left empty is
        no name)."""
        return Path(self.output_dir) / (self.name or Path(path).stem)


@dataclass
class StudyRun:
    name: str
    raw: dict = field(default_factory=dict)


@contextmanager
def naming(path: Path, what: str = "") -> Iterator[None]:
    """A `PeftlabError` raised inside names the study file (and `what`, e.g. "run 'lora'") it comes from."""
    try:
        yield
    except PeftlabError as err:
        if not str(err).startswith(f"{path}:"):
            err.args = (f"{path}: {what + ': ' if what else ''}{err}",)
        raise


def _expand_grid(grid: Grid, where: str) -> list[StudyRun]:
    keys = list(grid.params)
    runs = []
    for values in itertools.product(*(grid.params[k] for k in keys)):
        raw = copy.deepcopy(grid.config)
        for key, value in zip(keys, values, strict=True):  # the values as read: no round trip through YAML text
            set_dotted(raw, str(key), value, f"{where}.params.{key}")
        label = "-".join(f"{str(k).rsplit('.', 1)[-1]}{v}" for k, v in zip(keys, values, strict=True))
        runs.append(StudyRun(f"{grid.name}-{label}" if label else grid.name, raw))
    return runs


def _study_run(raw: RunEntry) -> StudyRun:
    run = dict(raw)
    method = run.get("method")
    named = method.get("name") if isinstance(method, dict) else None  # checked as method.name when it resolves
    return StudyRun(run.pop("name", None) or (named if isinstance(named, str) else None) or "run", run)


def load_study(path: Path) -> tuple[Study, list[StudyRun]]:
    """Parse a study YAML into its header and the runs it expands to (none for a sweep, which has only a base).

    Its shape is checked here, before any folder is made: a study that is empty, a list, or holds a list where a
    mapping belongs is an error naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"{path}: no such study file")
    raw = read_yaml(path)
    if raw is None:
        raise PeftlabError(f"{path}: empty study; expected a mapping with base: and runs: (see examples/)")
    if not isinstance(raw, dict):
        raise PeftlabError(f"{path}: expected a study mapping (name, base, runs, ...), got {describe(raw)}")
    with naming(path):
        study = checked(Study, raw, kind="study")
        runs = [_study_run(r) for r in study.runs]
        for i, grid in enumerate(study.grids):
            runs += _expand_grid(grid, f"grids[{i}]")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise PeftlabError(f"{path}: run names must be unique, got {names}")
    return study, runs
