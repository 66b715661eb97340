"""Optuna searches whose trials run as tasks on an executor: one process owns the study, the workers only train.

The owner asks Optuna for a trial, turns it into a `RunTask` and tells Optuna the trial's value when the task comes
back. With N workers, N trials are in flight at once. TPE's `constant_liar` (Optuna's documented way to run TPE in
parallel) has the sampler treat the running trials as if they had scored badly, so that it does not ask for the
same point N times; with one worker no trial is running at ask time and it changes nothing. Median pruning happens
inside each worker, against the trials that had finished when it was asked for (`recipes.pruning`).

The study lives in Optuna storage (SQLite by default), so a search resumes: finished trials count, and a trial
that its owner left running (the owner killed) is adopted by the next owner and resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Discriminator, StrictBool, StrictFloat, StrictInt, Tag, model_validator
from pydantic.dataclasses import dataclass as section

from peftlab.core.config import RunConfig, set_dotted, to_dict
from peftlab.core.errors import NotSupported, PeftlabError
from peftlab.core.result import RunResult
from peftlab.core.schema import FORBID, setting
from peftlab.core.signals import Stopped
from peftlab.recipes.executors import Events, ExecutorSpec, open_pool
from peftlab.recipes.pruning import EpochPruner
from peftlab.recipes.runner import RunTask, load_run_config


def whole(where: str, value: Any, least: int) -> int:
    """An integer given on the command line (`--trials`), at least `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise PeftlabError(f"{where}: expected an integer >= {least}, got {value!r}")
    return value


@section(config=FORBID)
class Choices:
    """A categorical dimension of a search space."""

    choices: list = setting(help="the values to choose from", min_length=1)


@section(config=FORBID)
class Range:
    """A numeric dimension: integers when both bounds are integers, else floats."""

    low: StrictInt | StrictFloat = setting(help="the lowest value")
    high: StrictInt | StrictFloat = setting(help="the highest value")
    log: StrictBool = setting(False, "draw on a log scale")
    step: StrictInt | StrictFloat | None = setting(None, "the spacing of the values; default: any value")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low >= self.high:
            raise ValueError(f"low must be below high, got {self.low} and {self.high}")
        return self


@section(config=FORBID)
class Factor:
    """A tune space's `{factor: F}`: log-uniform in [default / F, default * F] around each method's own value."""

    factor: StrictInt | StrictFloat = setting(help="how far either way of the method's default", gt=1)


def _shape(entry: Any) -> str | None:
    """Which kind of dimension a space entry is, told by its keys (pydantic then checks that kind's values)."""
    keys = set(entry) if isinstance(entry, dict) else set()
    for tag, needs in (("choices", {"choices"}), ("factor", {"factor"}), ("range", {"low", "high"})):
        if needs <= keys:
            return tag
    return None


def _by_shape(members: Any, shapes: str) -> Any:
    """A union of space entries told apart by `_shape`; an entry of no known shape is an error listing `shapes`."""
    return Annotated[members, Discriminator(_shape, custom_error_type="space_entry",
                                            custom_error_message=f"expected {shapes}")]


SHAPES = "{choices: [...]} or {low, high, log?, step?}"
_SWEEP = Annotated[Choices, Tag("choices")] | Annotated[Range, Tag("range")]
SweepEntry = _by_shape(_SWEEP, SHAPES)
TuneEntry = _by_shape(_SWEEP | Annotated[Factor, Tag("factor")], f"{SHAPES} or {{factor: F}}")


def as_space(entries: dict[str, Choices | Range]) -> dict[str, dict]:
    """A space's checked entries as the mappings `suggest` reads: {choices} or {low, high, log, step}."""
    return {key: dataclasses.asdict(entry) for key, entry in entries.items()}


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    """One value per key: categorical for choices, int for integer bounds, float otherwise. Asked again of a
    trial that already has its values (one adopted after its owner died), Optuna returns the same values."""
    params = {}
    for key, s in space.items():
        if "choices" in s:
            params[key] = trial.suggest_categorical(key, s["choices"])
        elif isinstance(s["low"], int) and isinstance(s["high"], int):
            params[key] = trial.suggest_int(key, s["low"], s["high"], step=s["step"] or 1, log=s["log"])
        else:
            params[key] = trial.suggest_float(key, s["low"], s["high"], step=s["step"], log=s["log"])
    return params


def trial_config(base: dict, params: dict[str, Any], name: str, output_dir: Path) -> RunConfig:
    """The base run config with one trial's values set at their dotted keys (as values, not reparsed as text)."""
    raw = {**copy.deepcopy(base), "name": name, "output_dir": str(output_dir)}
    for key, value in params.items():
        set_dotted(raw, key, value, f"sweep.space.{key}")
    return load_run_config(None, [], base=raw)


def base_of(cfg: RunConfig) -> dict:
    """A run's config as a mapping without its name and folder: the base that `trial_config` names anew."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("name", "output_dir")}


def trial_value(result: RunResult, metric: str | None = None) -> float:
    """A finished trial's val metric (`metric`, default its primary metric): what the search maximizes."""
    key = f"val_{metric or result.primary_metric}"
    if key not in result.metrics:
        raise PeftlabError(f"{result.name}: no {key} in its result.json; a search needs a val split (data.split)")
    return float(result.metrics[key])


# ---------------------------------------------------------------------------------------------------------------------
# Optuna storage and study
# ---------------------------------------------------------------------------------------------------------------------


def open_storage(url: str):
    """The Optuna database at `url`; a URL that is not one, or a database that cannot be opened, is one line naming
    the URL. (No heartbeats: they are kept by `study.optimize`, and here the owner asks and tells. A trial that a
    dead owner left running is adopted by the next owner of the study's own database; on a shared `--storage` it
    stays running and is not counted, so the other machines run one more.)"""
    import optuna
    import sqlalchemy.exc

    try:
        return optuna.storages.RDBStorage(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, ImportError) as err:  # no scheme, unknown dialect or driver
        reason = str(err).splitlines()[0]
        raise PeftlabError(f"--storage {url!r}: not a database URL Optuna can use ({reason}); e.g. "
                           "sqlite:///runs/sweep.db or postgresql://user@host/db") from None
    except sqlalchemy.exc.SQLAlchemyError as err:  # a missing folder, a refused connection, a bad password
        reason = str(getattr(err, "orig", None) or err).splitlines()[0]
        raise PeftlabError(f"--storage {url!r}: cannot open the database ({reason})") from None


@dataclass(frozen=True)
class Search:
    """One search: its study, how a trial becomes a run, and how trials are judged and pruned."""

    name: str
    storage: str  # an Optuna database URL
    space: dict[str, dict]
    make_config: Callable[[int, dict], RunConfig]  # (trial number, params) -> the trial's run config
    trials: int = 8  # finished (complete or pruned) trials wanted
    seed: int = 0
    pruner: str = "median"
    startup_trials: int = 2
    direction: str = "maximize"
    metric: str | None = None
    score_test: bool = False  # a study's tuning never scores test; a sweep's trials are ordinary runs
    owned: bool = True  # the study's own database: a trial left running is ours to adopt (False: shared --storage)


def create_study(search: Search):
    """Load or create the search's Optuna study, with its pruner and a TPE sampler seeded past its trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=search.name, storage=open_storage(search.storage), load_if_exists=True,
                                direction=search.direction)
    # Offset the seed by the trials already stored: a resumed sweep must not redraw the first run's parameters.
    # TPE models the space after a third of the budget (at most 10 random trials), so short sweeps still use it.
    seed = search.seed + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, search.trials // 3)),
                                               constant_liar=True)
    return study


def finished_trials(study) -> list:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def run_search(search: Search, study, executor: ExecutorSpec, events: Events | None = None) -> None:
    """Ask, train and tell until `search.trials` trials have finished, up to `executor.workers` at once.

    At most as many new trials are asked for as were missing at the start (as `study.optimize(n_trials=...)`), so
    a search whose trials all fail ends. A trial that fails is told as failed and the search goes on; a stop
    (SIGTERM, Ctrl-C) stops the trials in flight, which stay running in the study for the rerun to adopt.
    `events` hears each trial start and end, as a study's runs do (`recipes.executors.Events`).
    """
    import optuna

    running: dict[str, Any] = {}  # task name -> optuna.Trial
    asks = search.trials - len(finished_trials(study))
    orphans = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if search.owned]
    with open_pool(executor, events) as pool:
        while True:
            while pool.has_room and (orphans or (asks > 0 and len(finished_trials(study)) + len(running)
                                                 < search.trials)):
                if orphans:  # left running by an owner that died: the same trial, the same folder, its checkpoint
                    trial = optuna.Trial(study, orphans.pop(0)._trial_id)
                else:
                    trial, asks = study.ask(), asks - 1
                task = _trial_task(search, study, trial)
                pool.submit(task)
                running[task.name] = trial
            if not pool.busy:
                return
            task, result = pool.next_result()
            _tell(study, running.pop(task.name), result, search.metric)


def _trial_task(search: Search, study, trial) -> RunTask:
    cfg = search.make_config(trial.number, suggest(trial, search.space))
    last = cfg.train.epochs if cfg.train.max_steps is None else None
    pruner = EpochPruner(search.pruner, search.startup_trials, search.direction, search.metric, last,
                         tuple(finished_trials(study)))
    return RunTask.of(cfg, score_test=search.score_test, pruner=pruner)


def _tell(study, trial, result: RunResult, metric: str | None) -> None:
    """Tell Optuna how a trial ended: its epochs (the next trials' pruning medians) and its value or state."""
    import optuna

    for epoch, value in sorted(result.extra.get("epochs", {}).items()):
        trial.report(value, int(epoch))
    if result.status == "done":
        study.tell(trial, trial_value(result, metric))
    elif result.status == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif result.status == "stopped":  # stays running in the study: the rerun adopts it and resumes it
        raise Stopped(signal.SIGTERM, result.reason)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if result.status == "not_run":
            raise NotSupported(result.reason)
        print(f"trial {result.name} failed: {result.reason}; the search goes on", flush=True)
