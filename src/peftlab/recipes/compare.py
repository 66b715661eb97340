"""Studies: many runs on the same task, data, split and budget, then one table and one report.

A study YAML has a shared `base` run config, a list of `runs` (each a partial config on top of `base`), and
optional `grids` whose `params` are crossed, e.g. virtual tokens x learning rate. Every run trains in its own
process, so peak memory is measured per run and one crash does not take the study down. A run whose
`result.json` exists is skipped, so an interrupted study resumes where it stopped. SIGTERM or Ctrl-C stops the
training child too (it checkpoints its current step), writes no results.md, and exits 143 or 130 with one line.

A *decision study* adds `tune:` (every method chosen on val at the same budget, `recipes.tuning.tune_run`) and/or
`repeats:` (`{seeds: [0, 1, 2]}` or `{folds: 5}`: each chosen config rerun). It writes `study.json`, which maps each
method to its repeat folders, so the report can give every number a 95% interval, test each method against the best
and name the Pareto frontier (`report.decision`). `--plan` prints the runs and an estimated time before anything
trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from peftlab.core.config import RunConfig, deep_merge, load_config, to_dict
from peftlab.core.errors import PeftlabError
from peftlab.core.files import ensure_writable, read_json, write_json
from peftlab.core.result import RunResult, has_result
from peftlab.core.signals import Stopped, signal_name, stop_on_signals
from peftlab.experiments.distill import prepare_teacher
from peftlab.methods.registry import get_method
from peftlab.recipes.executors import ExecutorSpec, parse_executor, run_all
from peftlab.recipes.runner import RunTask
from peftlab.recipes.search import trial_config
from peftlab.recipes.study import StudyRun, load_study, naming
from peftlab.recipes.throughput import measure
from peftlab.recipes.tuning import CHOSEN, TuneSpec, parse_tune, tune_run
from peftlab.report.decision import MANIFEST
from peftlab.report.report import build_study_report

__all__ = ["StudyRun", "load_study", "run_study"]


def _resolve(path: Path, header: dict, runs: list[StudyRun], overrides: list[str], study_dir: Path
             ) -> list[RunConfig]:
    if not runs:  # a study of nothing used to make an empty study folder, or fail on the missing key
        raise PeftlabError(f"{path}: no runs to compare; list them under runs: (e.g. runs: "
                           "[{method: {name: lora}}]) or grids:")
    configs = []
    for run in runs:  # resolve every config first: a typo fails the study before hours of training
        raw = deep_merge(header["base"], run.raw)
        raw.update(name=run.name, output_dir=str(study_dir))
        with naming(path, f"run '{run.name}'"):
            configs.append(load_config(None, overrides, base=raw))
    return configs


def _chosen(configs: list[RunConfig], only: list[str] | None) -> list[RunConfig]:
    """The runs `--only` names; a name that is no run of the study is an error, not a study that runs nothing."""
    names = [c.name for c in configs]
    unknown = [name for name in only or [] if name not in names]
    if unknown:
        raise PeftlabError(f"--only: no run '{unknown[0]}' in the study; its runs: {', '.join(names)}")
    return [c for c in configs if only is None or c.name in only]


def run_study(path: Path, overrides: list[str] = (), only: list[str] | None = None, plan: bool = False,
              executor_kind: str | None = None, workers: int | None = None) -> Path:
    """Run every run of a study that is not finished yet, then write results.md/csv and report.html.

    With `tune` or `repeats` in the study, each method is first chosen on val, then rerun per seed or fold. With
    `plan`, only print the runs and the estimated time.
    """
    header, runs = load_study(path)
    study_dir = Path(header.get("output_dir", "runs")) / header.get("name", Path(path).stem)
    configs = _resolve(Path(path), header, runs, list(overrides), study_dir)
    with naming(Path(path)):
        spec = parse_tune(header["tune"]) if header.get("tune") is not None else None
        repeats = parse_repeats(header.get("repeats"))
        executor = parse_executor(header.get("executor"), executor_kind, workers)
    chosen = _chosen(configs, only)
    if plan:
        print(plan_text(chosen, spec, repeats, study_dir))
        return study_dir
    ensure_writable(study_dir, "set output_dir in the study to a writable folder")
    study_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM/SIGINT: the running child is stopped and waited for, and no results.md is written for a part study.
    with stop_on_signals():
        try:
            if header.get("teachers") or header.get("select_teacher"):  # distillation: rank teachers, teacher.jsonl
                prepare_teacher(header, configs, study_dir)
            if spec is not None or header.get("repeats") is not None:
                metric = header.get("metric") or (spec and spec.metric)
                failures = run_decision(chosen, spec, repeats, study_dir, metric, executor)
            else:
                todo = [c for c in chosen if not has_result(c.run_dir)]
                print(f"study {study_dir}: {len(chosen)} runs, {len(chosen) - len(todo)} already done, "
                      f"{len(todo)} to run")
                progress = Progress(sum(job_units(c) for c in todo))
                failures = run_finals(todo, executor, progress)
            # Every run failed: there is no table to write, only the failures to name.
            report = build_study_report(study_dir, title=header.get("name")) if _any_result(study_dir) else None
        except Stopped as stop:
            raise study_stopped(stop, chosen, repeats) from None
    if report is not None:
        print(f"results: {study_dir / 'results.md'}\nreport:  {report}")
    if failures:
        raise PeftlabError(f"{len(failures)} run(s) failed: {', '.join(failures)}; rerun the study to retry them")
    return study_dir


def _any_result(study_dir: Path) -> bool:
    return any(study_dir.glob("*/result.json"))


def run_finals(configs: list[RunConfig], executor: ExecutorSpec, progress: Progress) -> list[str]:
    """Run the configs on the executor, each in its own process; the names of the runs that failed (a run that
    cannot run here is listed in the report, not counted as a failure)."""
    tasks = [RunTask.of(c) for c in configs]
    units = {c.name: job_units(c) for c in configs}
    in_flight: set[str] = set()

    def events(event: str, task: RunTask, result: RunResult | None) -> None:
        if event == "start":
            in_flight.add(task.name)
            progress.show(f"{task.name} started ({len(in_flight)} in flight)")
            return
        in_flight.discard(task.name)
        if result.status == "done":
            print(f"run {task.name} done in {result.wall_seconds or 0:.0f} s", flush=True)
        elif result.status == "stopped":  # the study stops too: the run's own line says where it can go on from
            print(result.reason, flush=True)
        else:
            what = "not run here" if result.status == "not_run" else result.status
            print(f"run {task.name} {what}: {result.reason}; continuing", flush=True)
        progress.advance(units[task.name], f"{task.name} {result.status.replace('_', ' ')} "
                                           f"({len(in_flight)} in flight)")

    results = run_all(executor, tasks, events)
    return [r.name for r in results if r.status in ("failed", "stopped")]


def study_stopped(stop: Stopped, configs: list[RunConfig], repeats: Repeats) -> Stopped:
    """The study's one line for a stop: how many of its runs are finished, and how to go on."""
    finals = [f for c in configs for f in repeat_configs(c, repeats)]
    done = sum(has_result(f.run_dir) for f in finals)
    return Stopped(stop.signum, f"study stopped by {signal_name(stop.signum)}; {done} of {len(finals)} runs "
                                "finished; rerun the same command to resume")


# ---------------------------------------------------------------------------------------------------------------------
# Decision studies: tune, repeat, then intervals and a verdict (report.decision)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Repeats:
    """`seeds`: rerun with these train seeds on the same split; `folds`: rerun on each of k folds (data.fold)."""

    seeds: tuple[int, ...] = ()
    folds: int = 0


def parse_repeats(raw) -> Repeats:
    """`{seeds: [0, 1, 2]}` or `{folds: 5}`; None means one run per method at its configured seed."""
    if raw is None:
        return Repeats()
    if not isinstance(raw, dict) or len(raw) != 1 or not set(raw) <= {"seeds", "folds"}:
        raise PeftlabError("repeats: expected {seeds: [0, 1, 2]} or {folds: 5}")
    if "seeds" in raw:
        seeds = raw["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise PeftlabError(f"repeats.seeds: expected a non-empty list of integers, got {seeds!r}")
        return Repeats(seeds=tuple(seeds))
    if not isinstance(raw["folds"], int) or raw["folds"] < 3:
        raise PeftlabError(f"repeats.folds: expected an integer >= 3 (test, val, train), got {raw['folds']!r}")
    return Repeats(folds=raw["folds"])


def deterministic(cfg: RunConfig) -> bool:
    """Methods whose result does not depend on the train seed: zero/few-shot (nothing trains) and the linear head
    (a convex fit on frozen features). Over seeds they run once and that run stands for every seed."""
    method = get_method(cfg.method.name)
    return not method.trains or method.build is not None


def repeat_configs(cfg: RunConfig, repeats: Repeats) -> list[RunConfig]:
    """The final runs of one chosen config: one per seed (once for a deterministic method) or one per fold."""
    if repeats.folds:
        return [replace(cfg, name=f"{cfg.name}-fold{k}", data=replace(cfg.data, fold=k, folds=repeats.folds))
                for k in range(repeats.folds)]
    if not repeats.seeds:
        return [cfg]
    seeds = repeats.seeds[:1] if deterministic(cfg) else repeats.seeds
    return [replace(cfg, name=f"{cfg.name}-seed{s}", train=replace(cfg.train, seed=s)) for s in seeds]


def tuning_config(cfg: RunConfig, repeats: Repeats) -> RunConfig:
    """What tuning runs on: the study split, or fold 0's train/val with folds (fold 0's test is never scored)."""
    return replace(cfg, data=replace(cfg.data, fold=0, folds=repeats.folds)) if repeats.folds else cfg


def chosen_config(cfg: RunConfig, chosen: dict) -> RunConfig:
    """The run's config with the chosen values set (same name and folder as the run)."""
    if not chosen.get("params"):
        return cfg
    raw = {k: v for k, v in to_dict(cfg).items() if k not in ("name", "output_dir")}
    return trial_config(raw, chosen["params"], cfg.name, Path(cfg.output_dir))


def run_decision(configs: list[RunConfig], spec: TuneSpec | None, repeats: Repeats, study_dir: Path,
                 metric: str | None, executor: ExecutorSpec) -> list[str]:
    """Tune each method on val, then run every method's chosen config per seed/fold together on the executor;
    write study.json; returns the failed run names."""
    progress = Progress(sum(plan_units(c, spec, repeats, study_dir) for c in configs))
    finals = [f for c in configs for f in repeat_configs(c, repeats)]
    left = sum(not has_result(f.run_dir) for f in finals)
    tuned = sum(spec is not None and (study_dir / "tune" / c.name / CHOSEN).is_file() for c in configs)
    print(f"study {study_dir}: {len(configs)} methods, {tuned} already tuned; {len(finals)} final runs, "
          f"{len(finals) - left} already done, {left} to run", flush=True)
    manifest = study_dir / MANIFEST
    # `--only` runs some methods: the others stay in the manifest, and in the decision.
    groups: dict = read_json(manifest)["groups"] if manifest.is_file() else {}
    todo = []
    for cfg in configs:
        chosen = {"params": {}, "value": None, "trials": 0}
        if spec is not None:
            units = trial_units(cfg)
            chosen = tune_run(tuning_config(cfg, repeats), spec, study_dir / "tune" / cfg.name, executor,
                              tick=lambda label, u=units: progress.advance(u, label))
            print(f"{cfg.name}: chosen {chosen['params'] or '(no knobs)'} val {chosen['value']}", flush=True)
        finals = repeat_configs(chosen_config(cfg, chosen), repeats)
        todo += [f for f in finals if not has_result(f.run_dir)]  # a rerun skips finished ones
        groups[cfg.name] = {"method": cfg.method.name, "runs": [f.name for f in finals], "chosen": chosen}
        write_json(manifest, {"metric": metric, "repeats": vars_repeats(repeats), "groups": groups})
    return run_finals(todo, executor, progress)


def vars_repeats(repeats: Repeats) -> dict:
    return {"seeds": list(repeats.seeds)} if repeats.seeds else ({"folds": repeats.folds} if repeats.folds else {})


# ---------------------------------------------------------------------------------------------------------------------
# Cost model: one progress bar over the whole study, and `--plan`
# ---------------------------------------------------------------------------------------------------------------------


def _sizes(cfg: RunConfig) -> tuple[int, int]:
    """(train examples, eval examples per split), as configured; 400/50 stand for PubMedQA's default split."""
    return cfg.data.limit_train or 400, cfg.data.limit_eval or 50


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
        return evals * (1 + (cfg.data.shots or (3 if cfg.method.name == "few-shot" else 0)))
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
    """One text progress bar for the whole study: share of the estimated work done, elapsed time and ETA."""

    def __init__(self, total: float, width: int = 30) -> None:
        self.total, self.done, self.width, self.t0 = max(total, 1e-9), 0.0, width, time.perf_counter()

    def advance(self, units: float, label: str) -> None:
        """Count `units` of work as done and show the bar with `label` (which says how that work ended)."""
        self.done = min(self.total, self.done + units)
        self.show(label)

    def show(self, label: str) -> None:
        share = self.done / self.total
        elapsed = time.perf_counter() - self.t0
        eta = elapsed * (1 - share) / share if share > 0 else None
        bar = "#" * round(share * self.width) + "-" * (self.width - round(share * self.width))
        print(f"study [{bar}] {100 * share:3.0f}% elapsed {_clock(elapsed)} ETA {_clock(eta)} | {label}", flush=True)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plan_text(configs: list[RunConfig], spec: TuneSpec | None, repeats: Repeats, study_dir: Path) -> str:
    """Runs per method and the estimated time, from tokens/s measured on this machine with the study's model."""
    speed = measure(configs[0])
    lines = [f"plan for {study_dir}: measured {speed.tokens_per_s:,.0f} tokens/s forward, "
             f"{speed.tokens_per_example:.0f} tokens per example, {speed.load_s:.1f} s to load the model",
             "| method | tuning runs | final runs | estimated |", "|---|---|---|---|"]
    total_runs, total_s = 0, 0.0
    for cfg in configs:
        points = _tune_points(cfg, spec, study_dir)
        finals = [f for f in repeat_configs(cfg, repeats) if not has_result(f.run_dir)]
        units = plan_units(cfg, spec, repeats, study_dir)
        seconds = units * speed.tokens_per_example / speed.tokens_per_s + (points + len(finals)) * speed.overhead_s
        total_runs += points + len(finals)
        total_s += seconds
        lines.append(f"| {cfg.name} ({cfg.method.name}) | {points} | {len(finals)} | {_clock(seconds)} |")
    lines.append(f"total: {total_runs} runs, about {_clock(total_s)} (h:mm:ss; pruned trials end early, so this is "
                 "an upper bound for tuning)")
    return "\n".join(lines)
