"""One run as a task: a function that takes a run's resolved config and returns its typed result.

Every multi-run command (`compare`, `cv`) hands its runs to an executor (`recipes.executors`) as `RunTask`s, and
each executor calls `run_task` in a fresh process: a local worker, or a Ray worker on any node. The task carries
the config as a plain dict, so it pickles to another process or machine, and the result comes back as a
`RunResult` whose `status` says how the run ended: done, not run here (a missing package or backend), failed, or
stopped by a signal. Nothing about a run's outcome travels as an exit code any more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from peftlab.core.config import RunConfig, from_dict, load_config, to_dict
from peftlab.core.errors import NotSupported, PeftlabError
from peftlab.core.result import RunResult, has_result, read_result
from peftlab.core.signals import Stopped
from peftlab.methods.passthrough import check_peft
from peftlab.recipes.pruning import EpochPruner, Pruned
from peftlab.recipes.train_run import run_training
from peftlab.report.notes import NOT_RUN, write_not_run

# Config fields that hold paths: made absolute before a task leaves the driver, so a worker whose working folder
# differs (a Ray worker) still finds the files.
_PATH_FIELDS = (("data", "path"), ("data", "train"), ("data", "val"), ("data", "test"), ("data", "target"),
                ("data", "task"), ("model", "name"), ("experiments", "general_text"))


@dataclass(frozen=True)
class RunTask:
    """One run to execute. `score_test=False` is a tuning trial, judged on val only (the test split is never
    scored). `threads` applies when the config leaves `train.threads` unset: an executor splits the cores it has
    between its workers. `pruner`: a tuning trial that may be stopped after an epoch (`recipes.pruning`)."""

    config: dict
    score_test: bool = True
    score_val: bool = True  # False: a final run of a decision study, whose val already chose its config
    threads: int | None = None
    pruner: EpochPruner | None = None
    tags: dict = field(default_factory=dict)  # the caller's own bookkeeping (which method, seed or fold)

    @classmethod
    def of(cls, cfg: RunConfig, score_test: bool = True, pruner: EpochPruner | None = None, score_val: bool = True,
           **tags) -> RunTask:
        return cls(config=_absolute_paths(to_dict(cfg)), score_test=score_test, score_val=score_val, pruner=pruner,
                   tags=tags)

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def run_dir(self) -> Path:
        return Path(self.config["output_dir"]) / self.config["name"]


def _absolute_paths(raw: dict) -> dict:
    for section, key in _PATH_FIELDS:
        value = raw.get(section, {}).get(key)
        # A name (a packaged model, a registered task, `gold`) stays a name even if a folder happens to share it.
        is_name = (section, key) == ("data", "task") and not value.endswith((".yaml", ".yml")) if value else True
        is_name = is_name or ((section, key) == ("data", "target") and value in ("gold", "teacher"))
        if isinstance(value, str) and not is_name and Path(value).exists():
            raw[section][key] = str(Path(value).resolve())
    raw["output_dir"] = str(Path(raw["output_dir"]).resolve())
    return raw


def run_task(task: RunTask) -> RunResult:
    """Train (or score) one run in this process and return its result; a finished run is only read back.

    A run that was started and stopped goes on from its last checkpoint (`train.resume`). A tuning trial's result
    carries the val metric of each epoch in `extra["epochs"]` (for its owner's pruner), and its `extra["error"]`
    names the kind of failure (`NonFiniteLoss` ends a trial, not a search).
    """
    cfg = from_dict(RunConfig, task.config)
    if has_result(cfg.run_dir):
        return read_result(cfg.run_dir)
    cfg.train.resume = True
    if cfg.train.threads is None and task.threads:
        cfg.train.threads = task.threads
    (cfg.run_dir / NOT_RUN).unlink(missing_ok=True)  # retried: the machine may have what it lacked last time
    epochs: dict[int, float] = {}
    try:
        run_training(cfg, task.pruner.callback(epochs) if task.pruner else None, task.score_test, task.score_val)
    except NotSupported as err:
        write_not_run(cfg, str(err))  # the study report shows why this run has no row
        return ended(task, "not_run", str(err))
    except Stopped as err:
        return ended(task, "stopped", str(err))
    except Pruned as err:
        return ended(task, "pruned", str(err), epochs=epochs)
    except PeftlabError as err:
        return ended(task, "failed", str(err), error=type(err).__name__)
    result = read_result(cfg.run_dir)
    result.extra["epochs"] = epochs
    return result


def load_run_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """`core.config.load_config`, then the method stage's check of `method.peft` and `method.peft_config`, so that
    a misspelt peft field stops a study, sweep or run when its config loads, before anything trains."""
    cfg = load_config(path, overrides, base)
    check_peft(cfg.method)
    return cfg


def ended(task: RunTask, status: str, reason: str, **extra) -> RunResult:
    """The result of a run that did not finish: how it ended and the one line that says why."""
    return RunResult(name=task.name, method=task.config["method"]["name"], status=status, reason=reason,
                     extra=extra)


def default_threads(workers: int) -> int:
    """torch threads per worker when `train.threads` is unset: the cores split evenly, at least one each."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
