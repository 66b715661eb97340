"""A study's tuning (`peftlab compare` with a `tune:` section): every method chosen on val, at the same budget.

Gradient-trained methods get `trials` Optuna trials each (`recipes.search`: the trials run as tasks on the study's
executor, up to `workers` at once). Methods that train no gradients get their `select` grid, every point scored on
val, also as tasks. Nothing here scores the test split: trials and selection points are judged on val only.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, StrictStr
from pydantic.dataclasses import dataclass

from peftlab.core.config import RunConfig
from peftlab.core.errors import PeftlabError
from peftlab.core.files import read_json, write_json
from peftlab.core.schema import FORBID, checked, empty_is_default, setting
from peftlab.methods.registry import Method, get_method
from peftlab.recipes.executors import Events, ExecutorSpec, run_all
from peftlab.recipes.runner import RunTask
from peftlab.recipes.search import (
    Factor,
    Range,
    Search,
    TuneEntry,
    as_space,
    base_of,
    create_study,
    run_search,
    trial_config,
    trial_value,
)

CHOSEN = "chosen.json"
LOCAL = ExecutorSpec()  # one local worker
SelectGrid = dict[str, Annotated[list, Field(min_length=1)]]  # a `select` grid: {config.key: [values, ...]}


@dataclass(config=FORBID)
class TuneSpec:
    """A study's `tune:` section.

    `space` applies to every gradient-trained method; `train.lr: {factor: F}` means log-uniform in
    [default / F, default * F] around each method's own default (or its configured lr). `methods` adds dimensions per
    run or method name (`lora: {method.r: {choices: [4, 8, 16]}}`). `select` gives the grid of methods that train
    no gradients (`few-shot: {data.shots: [1, 3]}`, `linear-head: {method.head_c: [0.01, 0.1, 1]}`): each point is
    scored on val and the best is kept, with no test scoring either way.
    """

    trials: StrictInt = setting(8, "Optuna trials per gradient-trained method", ge=1)
    seed: StrictInt = setting(0, "TPE sampler seed", ge=0)
    pruner: Literal["median", "none"] = setting("median", "median pruning on the per-epoch val metric, or none")
    startup_trials: StrictInt = setting(2, "trials that are never pruned while the median forms", ge=0)
    space: dict[str, TuneEntry] = setting({}, "config.key: {low, high}, {choices} or {factor: F}, for every "
                                              "gradient-trained method")
    methods: dict[str, dict[str, TuneEntry] | None] = setting({}, "run or method name: more dimensions, on top of "
                                                                  "space")
    select: dict[str, SelectGrid] = setting({}, "run or method name: the grid a method that trains no gradients is "
                                          "chosen from, {config.key: [values, ...]}")
    metric: StrictStr | None = setting(None, "the val metric to maximize; default: the task's primary metric")

    _empty = empty_is_default("trials", "seed", "pruner", "startup_trials", "space", "methods", "select")


def parse_tune(raw: Any, where: str = "tune") -> TuneSpec:
    """Check a `tune:` section; an unknown key or a malformed space is an error that names the key."""
    return checked(TuneSpec, raw, where, "study", "with trials, space, methods, select; see docs/experiments.md")


def method_space(spec: TuneSpec, cfg: RunConfig, method: Method) -> dict[str, dict]:
    """The search space of one gradient-trained run of `method`: the shared space (lr around its default) plus its
    own."""
    entries = {**spec.space, **(spec.methods.get(cfg.name, spec.methods.get(cfg.method.name)) or {})}
    resolved = {}
    for key, entry in entries.items():
        if isinstance(entry, Factor):
            center = cfg.train.lr or method.default_lr
            entry = Range(low=center / entry.factor, high=center * entry.factor, log=True)
        resolved[key] = entry
    return as_space(resolved)


def _grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def _select(cfg: RunConfig, grid: dict, tune_dir: Path, metric: str | None, executor: ExecutorSpec,
            events: Events | None) -> dict:
    """Score every grid point on val (each a resumable folder `select-<i>`), as tasks on the executor; the best
    point wins, the first on ties."""
    points = _grid_points(grid)
    tasks = [RunTask.of(trial_config(base_of(cfg), params, f"select-{i}", tune_dir), score_test=False)
             for i, params in enumerate(points)]

    best: dict = {"params": {}, "value": None}
    for params, result in zip(points, run_all(executor, tasks, events), strict=True):
        if not result.done:
            raise PeftlabError(f"tuning {cfg.name}: {result.name} {result.status.replace('_', ' ')}: {result.reason}")
        value = trial_value(result, metric)
        if best["value"] is None or value > best["value"]:
            best = {"params": params, "value": value}
    return {**best, "trials": len(points)}


def _search(cfg: RunConfig, spec: TuneSpec, space: dict, tune_dir: Path, executor: ExecutorSpec,
            events: Events | None) -> dict:
    """Optuna TPE over `space`, median pruning; trials are `trial-<n>` folders; the study resumes from SQLite."""
    base = base_of(cfg)
    search = Search(name=cfg.name, storage=f"sqlite:///{(tune_dir / 'optuna.db').resolve()}", space=space,
                    make_config=lambda number, params: trial_config(base, params, f"trial-{number}", tune_dir),
                    trials=spec.trials, seed=spec.seed, pruner=spec.pruner, startup_trials=spec.startup_trials,
                    metric=spec.metric)
    study = create_study(search)
    run_search(search, study, executor, events)
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        raise PeftlabError(f"tuning {cfg.name}: no trial completed; see the trial folders under {tune_dir}")
    return {"params": study.best_trial.params, "value": study.best_value, "trials": spec.trials}


def tune_run(cfg: RunConfig, spec: TuneSpec, tune_dir: Path, executor: ExecutorSpec = LOCAL,
             events: Events | None = None) -> dict:
    """Choose one run's config on val and write it to `<tune_dir>/chosen.json`; an existing one is reused as is.

    Gradient methods: `spec.trials` Optuna trials. Methods that train no gradients: their `select` grid, or nothing
    when they have no knob. Trials and points run as tasks on `executor`; `events` hears each start and end.
    Returns {"params": {dotted key: value}, "value": val metric or None, "trials": n}.
    """
    chosen_path = tune_dir / CHOSEN
    if chosen_path.is_file():
        return read_json(chosen_path)
    tune_dir.mkdir(parents=True, exist_ok=True)
    method = get_method(cfg.method.name)
    grid = spec.select.get(cfg.name, spec.select.get(cfg.method.name))
    space = method_space(spec, cfg, method) if method.trains and method.build is None else {}
    if space:
        chosen = _search(cfg, spec, space, tune_dir, executor, events)
    elif grid:
        chosen = _select(cfg, grid, tune_dir, spec.metric, executor, events)
    else:
        chosen = {"params": {}, "value": None, "trials": 0}
    write_json(chosen_path, chosen)
    return chosen
