"""Hyperparameter sweeps with Optuna: TPE search, median pruning on the per-epoch val metric, resumable storage.

A sweep is a study YAML with a `base` run config and a `sweep` section:

    sweep:
      trials: 12                       # finished (complete or pruned) trials wanted in total
      seed: 0                          # TPE sampler seed
      pruner: median                   # median or none
      startup_trials: 5                # trials that are never pruned while the median forms
      space:
        train.lr: {low: 1e-3, high: 1e-1, log: true}
        method.num_virtual_tokens: {choices: [10, 20]}
        train.epochs: {low: 1, high: 3}

Every trial is a normal run folder `<study>/trial-<n>/`, so it appears in results.md and report.html. Trials run
as tasks on an executor (`--executor local|ray --workers N`, or the study's `executor:` section; `recipes.search`).
The study lives in Optuna storage (default `sqlite:///<study>/optuna.db`) and is loaded if it exists, so an
interrupted sweep resumes; several machines given the same database URL (e.g. PostgreSQL) work one study together.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import StrictInt
from pydantic.dataclasses import dataclass as section

from peftlab.core.config import apply_overrides, save_config
from peftlab.core.errors import PeftlabError
from peftlab.core.files import ensure_writable
from peftlab.core.result import RunResult
from peftlab.core.schema import FORBID, checked, setting
from peftlab.core.signals import Stopped, signal_name, stop_on_signals
from peftlab.core.yamlio import describe
from peftlab.recipes.executors import parse_executor
from peftlab.recipes.runner import RunTask
from peftlab.recipes.search import (
    Search,
    SweepEntry,
    as_space,
    create_study,
    finished_trials,
    run_search,
    trial_config,
    whole,
)
from peftlab.recipes.study import Study, load_study, naming
from peftlab.report.study_report import build_study_report

SPACE = "config keys, e.g. train.lr, to {low, high} or {choices}"  # what a space maps


@section(config=FORBID)
class SweepSpec:
    """A sweep study's `sweep:` section."""

    space: dict[str, SweepEntry] = setting(help="config.key: {low, high, log?, step?} or {choices: [...]}",
                                           note=SPACE, min_length=1)
    trials: StrictInt = setting(10, "finished (complete or pruned) trials wanted in total", ge=1)
    seed: StrictInt = setting(0, "TPE sampler seed", ge=0)
    pruner: Literal["median", "none"] = setting("median", "median pruning on the per-epoch val metric, or none")
    startup_trials: StrictInt = setting(5, "trials that are never pruned while the median forms", ge=0)
    direction: Literal["maximize", "minimize"] = setting("maximize", "whether the val metric is maximized")


def parse_sweep(raw: Any) -> SweepSpec:
    """Check a `sweep:` section; an unknown key or a malformed space entry is an error that names the key."""
    return checked(SweepSpec, raw, "sweep", "study")


def _check_header(header: Study, path: Path) -> SweepSpec:
    if not isinstance(header.sweep, dict):
        got = "it has none" if header.sweep is None else f"got {describe(header.sweep)}"
        raise PeftlabError(f"{path}: a sweep needs a `sweep:` mapping with a `space:` (see docs/experiments.md), "
                           f"{got}")
    with naming(path):
        return parse_sweep(header.sweep)


def trial_events(event: str, task: RunTask, result: RunResult | None) -> None:
    """A line as each trial starts and ends (how it ended, and why where it did not finish)."""
    if event == "start":
        print(f"{task.name} started", flush=True)
    else:
        why = f": {result.reason}" if result.reason and result.status != "done" else ""
        print(f"{task.name} {result.status.replace('_', ' ')}{why}", flush=True)


def run_sweep(path: Path, trials: int | None = None, storage: str | None = None, overrides: list[str] = (),
              seed: int | None = None, executor_kind: str | None = None, workers: int | None = None) -> Path:
    """Run (or resume) a sweep until `trials` trials have finished; write best_config.yaml, trials.csv, report.

    `seed` overrides `sweep.seed`: give each machine of a shared-storage sweep its own.
    """
    header, _ = load_study(Path(path))
    sweep = _check_header(header, Path(path))
    with naming(Path(path)):
        executor = parse_executor(header.executor, executor_kind, workers)
    # `trials or ...` read --trials 0 as "the study's count" and ran it; a negative count ran nothing, exit 0.
    n_trials = whole("--trials", trials, 1) if trials is not None else sweep.trials
    study_dir = header.folder(path)
    name = header.name or Path(path).stem  # the Optuna study's name: a sweep started by an older peftlab resumes
    base = apply_overrides(copy.deepcopy(header.base), list(overrides))
    space = as_space(sweep.space)
    # Fail on a typo in the space or base before any trial trains.
    with naming(Path(path)):
        trial_config(base, {k: s["choices"][0] if "choices" in s else s["low"] for k, s in space.items()}, "x",
                     study_dir)
    ensure_writable(study_dir, "set output_dir in the sweep to a writable folder")
    if storage is None:  # the default database lives in the study folder
        study_dir.mkdir(parents=True, exist_ok=True)
    search = Search(name=name, storage=storage or f"sqlite:///{(study_dir / 'optuna.db').resolve()}", space=space,
                    make_config=lambda number, params: trial_config(base, params, f"trial-{number}", study_dir),
                    trials=n_trials, seed=sweep.seed if seed is None else seed, pruner=sweep.pruner,
                    startup_trials=sweep.startup_trials, direction=sweep.direction, score_test=True,
                    owned=storage is None)
    study = create_study(search)
    study_dir.mkdir(parents=True, exist_ok=True)  # after a --storage that opens: a bad one leaves no empty folder
    print(f"sweep {study_dir}: {len(finished_trials(study))} of {n_trials} trials finished", flush=True)
    try:
        with stop_on_signals():  # the trials in flight checkpoint and stay running in the study, for the rerun
            run_search(search, study, executor, trial_events)
    except Stopped as stop:
        raise Stopped(stop.signum, f"sweep stopped by {signal_name(stop.signum)}; {len(finished_trials(study))} of "
                                   f"{n_trials} trials finished; rerun the same command to go on") from None
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        raise PeftlabError(f"sweep {name}: no trial completed; see the trial folders under {study_dir}")
    best = study.best_trial
    save_config(trial_config(base, best.params, "best", study_dir), study_dir / "best_config.yaml")
    study.trials_dataframe().to_csv(study_dir / "trials.csv", index=False)
    build_study_report(study_dir, title=name)
    print(f"best: trial-{best.number} value {best.value:.4f} params {best.params}\n"
          f"best config: {study_dir / 'best_config.yaml'} (peftlab train {study_dir / 'best_config.yaml'})")
    return study_dir
