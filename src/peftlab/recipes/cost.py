"""The cost model of a study: one progress bar over all its work, and `peftlab compare --plan`.

Work is counted in example-forwards (a training row counts 3: forward and backward), converted to seconds with the
speed measured on this machine (`recipes.throughput`). With N workers the runs share the cores, so the plan
measures the speed at each worker's share and divides the work between the workers.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from peftlab.core.config import RunConfig, to_dict
from peftlab.core.errors import PeftlabError
from peftlab.core.result import RunResult, has_result
from peftlab.data.splits import load_splits
from peftlab.data.tasks import task_for
from peftlab.methods.registry import get_method
from peftlab.recipes.executors import Events, ExecutorSpec
from peftlab.recipes.repeats import Repeats, repeat_configs
from peftlab.recipes.runner import RunTask, default_threads
from peftlab.recipes.throughput import measure
from peftlab.recipes.tuning import CHOSEN, TuneSpec

ONE_WORKER = ExecutorSpec()


_SIZES: dict[str, tuple[int, int, int]] = {}  # data section (JSON) -> (train, val, test) examples


def _split_sizes(cfg: RunConfig) -> tuple[int, int, int]:
    key = json.dumps(to_dict(cfg)["data"], sort_keys=True, default=str)
    if key not in _SIZES:
        splits = load_splits(cfg.data, task_for(cfg.data))
        _SIZES[key] = len(splits["train"]), len(splits["val"]), len(splits["test"])
    return _SIZES[key]


def _sizes(cfg: RunConfig) -> tuple[int, int]:
    """(train examples, eval examples per split) of the run, as its data and limits give them (the files are read,
    once per data section); 400/50, PubMedQA's default split, where they cannot be read (a mixture)."""
    try:
        n_train, n_val, n_test = _split_sizes(cfg)
    except (PeftlabError, OSError, KeyError, ValueError):
        return cfg.data.limit_train or 400, cfg.data.limit_eval or 50
    return n_train, max(n_val, n_test)


def _epochs_rows(cfg: RunConfig, n_train: int) -> float:
    if cfg.train.max_steps:
        return min(cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum, n_train * cfg.train.epochs)
    return n_train * cfg.train.epochs


def _units(cfg: RunConfig, test: bool) -> float:
    """Cost of one run in example-forwards: training counts 3 per row (forward and backward), val once per epoch."""
    n_train, n_eval = _sizes(cfg)
    method = get_method(cfg.method.name)
    evals = n_eval * (1 + int(test))
    if not method.trains:
        return evals * (1 + method.shots(cfg.data.shots))
    if method.build is not None:
        return n_train + evals
    return 3 * _epochs_rows(cfg, n_train) + n_eval * max(1, cfg.train.epochs) + n_eval * int(test)


def job_units(cfg: RunConfig) -> float:
    """A final run (scored on test)."""
    return _units(cfg, test=True)


def trial_units(cfg: RunConfig) -> float:
    """A tuning trial or selection point (val only)."""
    return _units(cfg, test=False)


def _tune_points(cfg: RunConfig, spec: TuneSpec | None, study_dir: Path) -> int:
    if spec is None or (study_dir / "tune" / cfg.name / CHOSEN).is_file():
        return 0
    method = get_method(cfg.method.name)
    if method.trains and method.build is None:
        return spec.trials
    grid = spec.select.get(cfg.name, spec.select.get(cfg.method.name)) or {}
    n = 1
    for values in grid.values():
        n *= len(values)
    return n if grid else 0


def plan_units(cfg: RunConfig, spec: TuneSpec | None, repeats: Repeats, study_dir: Path) -> float:
    """Work left for one method: its tuning points and its unfinished repeats."""
    finals = [f for f in repeat_configs(cfg, repeats) if not has_result(f.run_dir)]
    return _tune_points(cfg, spec, study_dir) * trial_units(cfg) + sum(job_units(f) for f in finals)


class Progress:
    """One progress line per event for the whole study: the share of the estimated work done, the runs finished
    and in flight, the elapsed time and the ETA. Elapsed time is wall time, so with several workers the rate, and
    the ETA with it, is that of all workers together. One line per event, not a redrawn bar: the runs' own output
    (or, with several workers, their logs) stays readable, and so does a log file of the study."""

    def __init__(self, total: float) -> None:
        self.total, self.done, self.t0 = max(total, 1e-9), 0.0, time.perf_counter()
        self.finished, self.in_flight = 0, 0

    def start(self, label: str) -> None:
        self.in_flight += 1
        self.show(label)

    def end(self, units: float, label: str) -> None:
        """A run or trial ended: count its `units` of work as done; `label` says how it ended."""
        self.in_flight, self.finished = max(0, self.in_flight - 1), self.finished + 1
        self.advance(units, label)

    def advance(self, units: float, label: str) -> None:
        self.done = min(self.total, self.done + units)
        self.show(label)

    def events(self, prefix: str, units: float) -> Events:
        """An executor's `events` for tasks of `units` each (a method's tuning trials), labelled `prefix`."""

        def on_event(event: str, task: RunTask, result: RunResult | None) -> None:
            if event == "start":
                self.start(f"{prefix} {task.name} started")
            else:
                self.end(units, f"{prefix} {task.name} {result.status.replace('_', ' ')}")

        return on_event

    def show(self, label: str) -> None:
        runs = f"{self.finished} done, {self.in_flight} in flight"
        line = tqdm.format_meter(self.done, self.total, time.perf_counter() - self.t0, prefix="study", ascii=True,
                                 bar_format="{desc}: {percentage:3.0f}%|{bar:30}| elapsed {elapsed} ETA {remaining}")
        print(f"{line} | {runs} | {label}", flush=True)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _wall(tuning: list[tuple[int, float]], finals: list[float], workers: int) -> float:
    """Wall seconds on `workers`: each method's trials in waves of `workers` (methods are tuned one after
    another), then all final runs shared out, never shorter than the longest one."""
    tune_s = sum(math.ceil(points / workers) * seconds for points, seconds in tuning if points)
    final_s = max(sum(finals) / workers, max(finals, default=0.0))
    return tune_s + final_s


def plan_text(configs: list[RunConfig], spec: TuneSpec | None, repeats: Repeats, study_dir: Path,
              executor: ExecutorSpec = ONE_WORKER) -> str:
    """Runs per method and the estimated wall time on `executor`, from tokens/s measured on this machine with the
    study's model, at the threads each worker would get."""
    threads = default_threads(executor.workers)
    speed = measure(configs[0], threads)
    per_run = speed.tokens_per_example / speed.tokens_per_s
    lines = [f"plan for {study_dir}: measured {speed.tokens_per_s:,.0f} tokens/s forward on {threads} thread(s), "
             f"{speed.tokens_per_example:.0f} tokens per example, {speed.load_s:.1f} s to load the model",
             "| method | tuning runs | final runs | estimated (one worker) |", "|---|---|---|---|"]
    tuning, finals_s, runs, serial = [], [], 0, 0.0
    for cfg in configs:
        points = _tune_points(cfg, spec, study_dir)
        finals = [f for f in repeat_configs(cfg, repeats) if not has_result(f.run_dir)]
        trial_s = trial_units(cfg) * per_run + speed.overhead_s
        tuning.append((points, trial_s))
        finals_s += [job_units(f) * per_run + speed.overhead_s for f in finals]
        seconds = points * trial_s + sum(job_units(f) * per_run + speed.overhead_s for f in finals)
        runs, serial = runs + points + len(finals), serial + seconds
        lines.append(f"| {cfg.name} ({cfg.method.name}) | {points} | {len(finals)} | {_clock(seconds)} |")
    where = "ray, on this machine's speed" if executor.kind == "ray" else "local"
    lines.append(f"total: {runs} runs, about {_clock(_wall(tuning, finals_s, executor.workers))} (h:mm:ss) on "
                 f"{executor.workers} {where} worker(s) of {threads} thread(s) each ({_clock(serial)} of run time); "
                 "pruned trials end early, so this is an upper bound for tuning")
    if repeats.race and repeats.rounds > 1:
        lines.append(_race_line(configs, repeats, tuning, per_run, speed.overhead_s, executor.workers))
    return "\n".join(lines)


def _race_line(configs: list[RunConfig], repeats: Repeats, tuning: list, per_run: float, overhead_s: float,
               workers: int) -> str:
    """Racing's range: the worst case runs every repeat (the total above); the best case stops every method but
    the dearest after its first round. Where a study lands between them depends on how far apart the methods are."""
    left = {c.name: [f for f in repeat_configs(c, repeats) if not has_result(f.run_dir)] for c in configs}
    runs = {name: [job_units(f) * per_run + overhead_s for f in fs] for name, fs in left.items()}
    kept = max(runs, key=lambda name: sum(runs[name]))
    best = [s for name, seconds in runs.items() for s in (seconds if name == kept else seconds[:1])]
    return (f"racing (alpha {repeats.alpha}): worst case as above (no method stops); best case about "
            f"{_clock(_wall(tuning, best, workers))}, every method but {kept} stopped after round 1 of "
            f"{repeats.rounds}")
