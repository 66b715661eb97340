"""A study's tuning (`peftlab compare` with a `tune:` section): every method chosen on val, at the same budget.

Gradient-trained methods get `trials` Optuna trials each (`recipes.search`: the trials run as tasks on the study's
executor, up to `workers` at once). Methods that train no gradients get their `select` grid, every point scored on
val, also as tasks. Nothing here scores the test split: trials and selection points are judged on val only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.core.config import RunConfig
from peftlab.core.errors import PeftlabError
from peftlab.core.files import read_json, write_json
from peftlab.core.yamlio import describe
from peftlab.methods.registry import Method, get_method
from peftlab.recipes.executors import Events, ExecutorSpec, run_all
from peftlab.recipes.runner import RunTask
from peftlab.recipes.search import (
    Search,
    base_of,
    create_study,
    number,
    parse_space,
    run_search,
    trial_config,
    trial_value,
    whole,
)

TUNE_KEYS = {"trials", "seed", "pruner", "startup_trials", "space", "methods", "select", "metric"}
CHOSEN = "chosen.json"
LOCAL = ExecutorSpec()  # one local worker


@dataclass
class TuneSpec:
    """A study's `tune:` section.

    `space` applies to every gradient-trained method; `train.lr: {factor: F}` means log-uniform in
    [default / F, default * F] around each method's own default (or its configured lr). `methods` adds dimensions per
    run or method name (`lora: {method.r: {choices: [4, 8, 16]}}`). `select` gives the grid of methods that train
    no gradients (`few-shot: {data.shots: [1, 3]}`, `linear-head: {method.head_c: [0.01, 0.1, 1]}`): each point is
    scored on val and the best is kept, with no test scoring either way.
    """

    trials: int = 8
    seed: int = 0
    pruner: str = "median"
    startup_trials: int = 2
    space: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    select: dict = field(default_factory=dict)
    metric: str | None = None


def parse_tune(raw: Any, where: str = "tune") -> TuneSpec:
    """Check a `tune:` section; unknown keys and malformed spaces are errors that name the key."""
    if not isinstance(raw, dict):
        raise PeftlabError(f"{where} must be a mapping with trials, space, methods, select (see docs/experiments.md)"
                           f", got {describe(raw)}")
    unknown = sorted(map(str, set(raw) - TUNE_KEYS))
    if unknown:
        raise PeftlabError(f"unknown {where} key '{unknown[0]}'; valid: {', '.join(sorted(TUNE_KEYS))}")
    spec = TuneSpec(**{k: v for k, v in raw.items() if v is not None})  # `select:` left empty is no select
    if spec.pruner not in ("median", "none"):
        raise PeftlabError(f"{where}.pruner must be median or none, got {spec.pruner!r}")
    for key, least in (("trials", 1), ("seed", 0), ("startup_trials", 0)):
        whole(f"{where}.{key}", getattr(spec, key), least)
    for key in ("space", "methods", "select"):
        if not isinstance(getattr(spec, key), dict):
            raise PeftlabError(f"{where}.{key}: expected a mapping, got {describe(getattr(spec, key))}")
    for name, extra in spec.methods.items():
        if extra is not None and not isinstance(extra, dict):
            raise PeftlabError(f"{where}.methods.{name}: expected {{config.key: {{low, high}} or {{choices}}}}")
        _check_tune_space({**spec.space, **(extra or {})})  # checked now, not when that method's tuning starts
    _check_tune_space(spec.space)
    for name, grid in spec.select.items():
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise PeftlabError(f"{where}.select.{name}: expected {{config.key: [values, ...]}}")
    if spec.metric is not None and not isinstance(spec.metric, str):
        raise PeftlabError(f"{where}.metric: expected a metric name, got {describe(spec.metric)}")
    return spec


def _check_tune_space(space: dict) -> None:
    """A tune space is a sweep space whose entries may also be `{factor: F}` (log-uniform around each default)."""
    plain = {}
    for key, s in space.items():
        if isinstance(s, dict) and "factor" in s:
            if number(f"{key}.factor", s["factor"]) <= 1:
                raise PeftlabError(f"sweep.space.{key}.factor must be above 1, got {s['factor']}")
        else:
            plain[key] = s
    if plain:
        parse_space(plain)


def method_space(spec: TuneSpec, cfg: RunConfig, method: Method) -> dict[str, dict]:
    """The search space of one gradient-trained run of `method`: the shared space (lr around its default) plus its
    own."""
    raw = dict(spec.space)
    extra = spec.methods.get(cfg.name, spec.methods.get(cfg.method.name, {}))
    raw.update(extra or {})
    resolved = {}
    for key, s in raw.items():
        if isinstance(s, dict) and "factor" in s:
            center = cfg.train.lr or method.default_lr
            factor = float(number(f"{key}.factor", s["factor"]))
            s = {"low": center / factor, "high": center * factor, "log": True}
        resolved[key] = s
    return parse_space(resolved) if resolved else {}


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
