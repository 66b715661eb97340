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

Every trial is a normal run folder `<study>/trial-<n>/`, so it appears in results.md and report.html. The study
lives in Optuna storage (default `sqlite:///<study>/optuna.db`) and is loaded if it exists, so an interrupted sweep
resumes; several machines given the same database URL (e.g. PostgreSQL) work one study together.
"""

from __future__ import annotations

import copy
import gc
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.core.config import RunConfig, apply_overrides, load_config, save_config, set_dotted, to_dict
from peftlab.core.errors import PeftlabError
from peftlab.core.files import ensure_writable, read_json, write_json
from peftlab.core.result import has_result, read_result
from peftlab.core.signals import Stopped, signal_name, stop_on_signals
from peftlab.core.yamlio import describe
from peftlab.methods.registry import get_method
from peftlab.recipes.study import load_study, naming
from peftlab.recipes.train import run_training
from peftlab.report.report import build_study_report
from peftlab.train.loop import NonFiniteLoss

SWEEP_KEYS = {"trials", "seed", "pruner", "startup_trials", "space", "direction"}


def _number(where: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PeftlabError(f"sweep.space.{where}: expected a number, got {value!r}")
    return value


def _whole(where: str, value: Any, least: int) -> int:
    """An integer setting (`trials`, `seed`) of a sweep or tune section, at least `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise PeftlabError(f"{where}: expected an integer >= {least}, got {value!r}")
    return value


def parse_space(space: Any) -> dict[str, dict]:
    """Check the search space: each key is a config path with `{choices: [...]}` or `{low, high, log?, step?}`."""
    if not isinstance(space, dict) or not space:
        raise PeftlabError("sweep.space must map config keys (e.g. train.lr) to {low, high} or {choices}")
    out = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise PeftlabError(f"sweep.space.{key}: expected {{choices: [...]}} or {{low, high, log?, step?}}")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise PeftlabError(f"sweep.space.{key}.choices must be a non-empty list")
            out[key] = {"choices": spec["choices"]}
            continue
        low, high = _number(f"{key}.low", spec["low"]), _number(f"{key}.high", spec["high"])
        if low >= high:
            raise PeftlabError(f"sweep.space.{key}: low must be below high, got {low} and {high}")
        out[key] = {"low": low, "high": high, "log": bool(spec.get("log", False)), "step": spec.get("step")}
    return out


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    """One value per key: categorical for choices, int for integer bounds, float otherwise."""
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
    return load_config(None, [], base=raw)


def _pruning_callback(trial, cfg: RunConfig, metric: str | None = None):
    """Report each epoch's val metric (`val_<metric>`, default the first one logged) to Optuna and prune on it."""
    import optuna

    def on_epoch_end(epoch: int, val_row: dict) -> None:
        wanted = f"val_{metric}" if metric else None
        key = wanted if wanted in val_row else next((k for k in val_row if k.startswith("val_") and k != "val_loss"),
                                                    None)
        if key is None:
            return
        trial.report(val_row[key], epoch)
        # After the last epoch the run is as good as finished: keep it rather than prune it.
        last = cfg.train.max_steps is None and epoch >= cfg.train.epochs
        if not last and trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {key} {val_row[key]:.4f} is below the median of earlier trials")

    return on_epoch_end


def objective_value(run_dir: Path, metric: str | None = None) -> float:
    """The run's final val metric (`metric`, default its primary metric), as written to result.json."""
    result = read_result(run_dir)
    key = f"val_{metric or result.primary_metric}"
    if key not in result.metrics:
        raise PeftlabError(f"{run_dir}: no {key} in result.json; a sweep needs a val split (data.split)")
    return float(result.metrics[key])


def quiet_optuna() -> None:
    """Optuna logs a trial that raised as failed, with a traceback; a stopped one gets its study's one line instead.

    Set back to WARNING by the next search (`_search`); a stop ends the command anyway.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def make_objective(base: dict, space: dict, study_dir: Path):
    def objective(trial) -> float:
        cfg = trial_config(base, suggest(trial, space), f"trial-{trial.number}", study_dir)
        try:
            run_dir = run_training(cfg, on_epoch_end=_pruning_callback(trial, cfg))
        except Stopped:
            quiet_optuna()
            raise
        finally:
            gc.collect()  # each trial loads its own model; free the last one before the next
        return objective_value(run_dir)

    return objective


def _check_header(header: dict, path: Path) -> dict:
    sweep = header.get("sweep")
    if not isinstance(sweep, dict):
        got = "it has none" if sweep is None else f"got {describe(sweep)}"
        raise PeftlabError(f"{path}: a sweep needs a `sweep:` mapping with a `space:` (see docs/experiments.md), "
                           f"{got}")
    unknown = sorted(map(str, set(sweep) - SWEEP_KEYS))
    if unknown:
        raise PeftlabError(f"{path}: unknown sweep key '{unknown[0]}'; valid: {', '.join(sorted(SWEEP_KEYS))}")
    with naming(path):
        if sweep.get("pruner", "median") not in ("median", "none"):
            raise PeftlabError(f"sweep.pruner must be median or none, got {sweep['pruner']!r}")
        if sweep.get("direction", "maximize") not in ("maximize", "minimize"):
            raise PeftlabError(f"sweep.direction must be maximize or minimize, got {sweep['direction']!r}")
        for key, least in (("trials", 1), ("seed", 0), ("startup_trials", 0)):
            if key in sweep:
                _whole(f"sweep.{key}", sweep[key], least)
        parse_space(sweep.get("space"))
    return sweep


def _storage(url: str):
    import warnings

    import optuna

    # Heartbeats let a later worker mark a trial whose process died (kill -9, lost machine) as failed and retry it.
    # Optuna >= 4.9 renamed the callback; both are "experimental", which is not worth a warning on every sweep.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        else:
            retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180, **retry)


def _open_storage(url: str):
    """`_storage`, with a URL that is not one, or a database that cannot be opened, as one line naming the URL."""
    import sqlalchemy.exc

    try:
        return _storage(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, ImportError) as err:  # no scheme, unknown dialect or driver
        reason = str(err).splitlines()[0]
        raise PeftlabError(f"--storage {url!r}: not a database URL Optuna can use ({reason}); e.g. "
                           "sqlite:///runs/sweep.db or postgresql://user@host/db") from None
    except sqlalchemy.exc.SQLAlchemyError as err:  # a missing folder, a refused connection, a bad password
        reason = str(getattr(err, "orig", None) or err).splitlines()[0]
        raise PeftlabError(f"--storage {url!r}: cannot open the database ({reason})") from None


def _create_study(name: str, storage: str, sweep: dict, n_trials: int):
    import optuna

    pruner = (optuna.pruners.MedianPruner(n_startup_trials=int(sweep.get("startup_trials", 5)))
              if sweep.get("pruner", "median") == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=_open_storage(storage), load_if_exists=True,
                                pruner=pruner, direction=sweep.get("direction", "maximize"))
    # Offset the seed by the trials already stored: a resumed sweep must not redraw the first run's parameters.
    # TPE models the space after a third of the budget (at most 10 random trials), so short sweeps still use it.
    seed = int(sweep.get("seed", 0)) + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)))
    return study


def run_sweep(
    path: Path,
    trials: int | None = None,
    storage: str | None = None,
    overrides: list[str] = (),
    seed: int | None = None,
) -> Path:
    """Run (or resume) a sweep until `trials` trials have finished; write best_config.yaml, trials.csv, report.

    `seed` overrides `sweep.seed`: give each worker of a shared-storage sweep its own.
    """
    import optuna

    header, _ = load_study(Path(path))
    sweep = _check_header(header, Path(path))
    sweep = {**sweep, "seed": sweep.get("seed", 0) if seed is None else seed}
    space = parse_space(sweep.get("space"))
    # `trials or ...` read --trials 0 as "the study's count" and ran it; a negative count ran nothing, exit 0.
    n_trials = _whole("--trials", trials, 1) if trials is not None else int(sweep.get("trials", 10))
    name = header.get("name", Path(path).stem)
    study_dir = Path(header.get("output_dir", "runs")) / name
    base = apply_overrides(copy.deepcopy(header["base"]), list(overrides))
    # Fail on a typo in the space or base before any trial trains.
    with naming(Path(path)):
        trial_config(base, {k: s["choices"][0] if "choices" in s else s["low"] for k, s in space.items()}, "x",
                     study_dir)
    ensure_writable(study_dir, "set output_dir in the sweep to a writable folder")
    if storage is None:  # the default database lives in the study folder
        study_dir.mkdir(parents=True, exist_ok=True)
    study = _create_study(name, storage or f"sqlite:///{(study_dir / 'optuna.db').resolve()}", sweep, n_trials)
    study_dir.mkdir(parents=True, exist_ok=True)  # after a --storage that opens: a bad one leaves no empty folder
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    print(f"sweep {study_dir}: {done} of {n_trials} trials finished", flush=True)
    if done < n_trials:
        callbacks = [optuna.study.MaxTrialsCallback(n_trials, states=finished)]
        try:
            with stop_on_signals():  # between trials too: a trial is never left 'running' in the database
                study.optimize(make_objective(base, space, study_dir), n_trials=n_trials - done,
                               catch=(NonFiniteLoss,), callbacks=callbacks)
        except Stopped as stop:  # the stopped trial starts over on the rerun; finished ones count
            done = len(study.get_trials(deepcopy=False, states=finished))
            raise Stopped(stop.signum, f"sweep stopped by {signal_name(stop.signum)}; {done} of {n_trials} trials "
                                       "finished; rerun the same command to go on") from None
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise PeftlabError(f"sweep {name}: no trial completed; see the trial folders under {study_dir}")
    best = study.best_trial
    save_config(trial_config(base, best.params, "best", study_dir), study_dir / "best_config.yaml")
    study.trials_dataframe().to_csv(study_dir / "trials.csv", index=False)
    build_study_report(study_dir, title=name)
    print(f"best: trial-{best.number} value {best.value:.4f} params {best.params}\n"
          f"best config: {study_dir / 'best_config.yaml'} (peftlab train {study_dir / 'best_config.yaml'})")
    return study_dir


# ---------------------------------------------------------------------------------------------------------------------
# Tuning inside a study (`peftlab compare` with a `tune:` section): every method at the same budget, chosen on val
# ---------------------------------------------------------------------------------------------------------------------

TUNE_KEYS = {"trials", "seed", "pruner", "startup_trials", "space", "methods", "select", "metric"}
CHOSEN = "chosen.json"


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
        _whole(f"{where}.{key}", getattr(spec, key), least)
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
            if _number(f"{key}.factor", s["factor"]) <= 1:
                raise PeftlabError(f"sweep.space.{key}.factor must be above 1, got {s['factor']}")
        else:
            plain[key] = s
    if plain:
        parse_space(plain)


def method_space(spec: TuneSpec, cfg: RunConfig) -> dict[str, dict]:
    """The search space of one gradient-trained run: the shared space (lr around its default) plus its own."""
    raw = dict(spec.space)
    extra = spec.methods.get(cfg.name, spec.methods.get(cfg.method.name, {}))
    raw.update(extra or {})
    resolved = {}
    for key, s in raw.items():
        if isinstance(s, dict) and "factor" in s:
            center = cfg.train.lr or get_method(cfg.method.name).default_lr
            factor = float(_number(f"{key}.factor", s["factor"]))
            s = {"low": center / factor, "high": center * factor, "log": True}
        resolved[key] = s
    return parse_space(resolved) if resolved else {}


def run_trial(cfg: RunConfig, on_epoch_end=None) -> Path:
    """A trial or a selection point: the training recipe without the test split, judged on val only.

    The test split is scored for final configs only, so choosing a config never looks at it (and trials do not pay
    for it). The folder gets result.json like any run, with val metrics and no test metrics.
    """
    return run_training(cfg, on_epoch_end, score_test=False)


def _base_raw(cfg: RunConfig) -> dict:
    raw = to_dict(cfg)
    raw.pop("name", None)
    raw.pop("output_dir", None)
    return raw


def _grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def _select(cfg: RunConfig, grid: dict, tune_dir: Path, metric: str | None, tick) -> dict:
    """Score every grid point on val (each a resumable folder `select-<i>`); the best point wins, first on ties."""
    best: dict = {"params": {}, "value": None, "trials": 0}
    for i, params in enumerate(_grid_points(grid)):
        trial = trial_config(_base_raw(cfg), params, f"select-{i}", tune_dir)
        if not has_result(trial.run_dir):
            run_trial(trial)
            gc.collect()
        value = objective_value(trial.run_dir, metric)
        tick(f"{cfg.name} select {i + 1} done")
        if best["value"] is None or value > best["value"]:
            best = {"params": params, "value": value}
    return {**best, "trials": len(_grid_points(grid))}


def _search(cfg: RunConfig, spec: TuneSpec, space: dict, tune_dir: Path, tick) -> dict:
    """Optuna TPE over `space` with median pruning; trials are `trial-<n>` folders; the study resumes from SQLite."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = {"seed": spec.seed, "pruner": spec.pruner, "startup_trials": spec.startup_trials}
    study = _create_study(cfg.name, f"sqlite:///{(tune_dir / 'optuna.db').resolve()}", sweep, spec.trials)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    base = _base_raw(cfg)

    def objective(trial) -> float:
        run = trial_config(base, suggest(trial, space), f"trial-{trial.number}", tune_dir)
        ended = "failed"
        try:
            run_trial(run, on_epoch_end=_pruning_callback(trial, run, spec.metric))
            ended = "done"
        except optuna.TrialPruned:
            ended = "pruned"
            raise
        except Stopped:
            ended = "stopped"
            quiet_optuna()
            raise
        finally:
            gc.collect()
            tick(f"{cfg.name} trial {trial.number + 1} {ended}")  # the progress bar says how the trial ended
        return objective_value(run.run_dir, spec.metric)

    done = len(study.get_trials(deepcopy=False, states=finished))
    if done < spec.trials:
        study.optimize(objective, n_trials=spec.trials - done, catch=(NonFiniteLoss,),
                       callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=finished)])
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise PeftlabError(f"tuning {cfg.name}: no trial completed; see the trial folders under {tune_dir}")
    return {"params": study.best_trial.params, "value": study.best_value, "trials": spec.trials}


def tune_run(cfg: RunConfig, spec: TuneSpec, tune_dir: Path, tick=lambda label: None) -> dict:
    """Choose one run's config on val and write it to `<tune_dir>/chosen.json`; an existing one is reused as is.

    Gradient methods: `spec.trials` Optuna trials. Methods that train no gradients: their `select` grid, or nothing
    when they have no knob. Returns {"params": {dotted key: value}, "value": val metric or None, "trials": n}.
    """
    chosen_path = tune_dir / CHOSEN
    if chosen_path.is_file():
        return read_json(chosen_path)
    tune_dir.mkdir(parents=True, exist_ok=True)
    method = get_method(cfg.method.name)
    grid = spec.select.get(cfg.name, spec.select.get(cfg.method.name))
    space = method_space(spec, cfg) if method.trains and method.build is None else {}
    if space:
        chosen = _search(cfg, spec, space, tune_dir, tick)
    elif grid:
        chosen = _select(cfg, grid, tune_dir, spec.metric, tick)
    else:
        chosen = {"params": {}, "value": None, "trials": 0}
    write_json(chosen_path, chosen)
    return chosen
