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

from dataclasses import asdict
from pathlib import Path

from peftlab.core.config import RunConfig, deep_merge
from peftlab.core.errors import PeftlabError
from peftlab.core.files import ensure_writable, read_json, write_json
from peftlab.core.result import RunResult, has_result
from peftlab.core.signals import Stopped, signal_name, stop_on_signals
from peftlab.experiments.distill import prepare_teacher
from peftlab.recipes.cost import Progress, job_units, plan_text, plan_units, trial_units
from peftlab.recipes.executors import ExecutorSpec, parse_executor, run_all
from peftlab.recipes.repeats import Repeats, chosen_config, parse_repeats, repeat_configs, tuning_config, vars_repeats
from peftlab.recipes.runner import RunTask, load_run_config
from peftlab.recipes.study import Study, StudyRun, load_study, naming
from peftlab.recipes.tuning import CHOSEN, TuneSpec, parse_tune, tune_run
from peftlab.report.decision import MANIFEST, race
from peftlab.report.study_report import build_study_report

__all__ = ["StudyRun", "load_study", "run_study"]


def _resolve(path: Path, study: Study, runs: list[StudyRun], overrides: list[str], study_dir: Path
             ) -> list[RunConfig]:
    if not runs:  # a study of nothing used to make an empty study folder, or fail on the missing key
        raise PeftlabError(f"{path}: no runs to compare; list them under runs: (e.g. runs: "
                           "[{method: {name: lora}}]) or grids:")
    configs = []
    for run in runs:  # resolve every config first: a typo fails the study before hours of training
        raw = deep_merge(study.base, run.raw)
        raw.update(name=run.name, output_dir=str(study_dir))
        with naming(path, f"run '{run.name}'"):
            configs.append(load_run_config(None, overrides, base=raw))
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
    study, runs = load_study(path)
    study_dir = study.folder(path)
    configs = _resolve(Path(path), study, runs, list(overrides), study_dir)
    with naming(Path(path)):
        spec = parse_tune(study.tune) if study.tune is not None else None
        repeats = parse_repeats(study.repeats)
        executor = parse_executor(study.executor, executor_kind, workers)
    chosen = _chosen(configs, only)
    if plan:
        print(plan_text(chosen, spec, repeats, study_dir, executor))
        return study_dir
    ensure_writable(study_dir, "set output_dir in the study to a writable folder")
    study_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM/SIGINT: the running child is stopped and waited for, and no results.md is written for a part study.
    with stop_on_signals():
        try:
            if study.teachers or study.select_teacher:  # distillation: rank teachers, write teacher.jsonl
                prepare_teacher({"teachers": study.teachers, "select_teacher": study.select_teacher}, configs,
                                study_dir)
            if spec is not None or study.repeats is not None:
                metric = study.metric or (spec and spec.metric)
                failures = run_decision(chosen, spec, repeats, study_dir, metric, executor)
            else:
                todo = [c for c in chosen if not has_result(c.run_dir)]
                print(f"study {study_dir}: {len(chosen)} runs, {len(chosen) - len(todo)} already done, "
                      f"{len(todo)} to run")
                progress = Progress(sum(job_units(c) for c in todo))
                failures = run_finals(todo, executor, progress)
            # Every run failed: there is no table to write, only the failures to name.
            report = build_study_report(study_dir, title=study.name) if _any_result(study_dir) else None
        except Stopped as stop:
            raise study_stopped(stop, chosen, repeats) from None
    if report is not None:
        print(f"results: {study_dir / 'results.md'}\nreport:  {report}")
    if failures:
        raise PeftlabError(f"{len(failures)} run(s) failed: {', '.join(failures)}; rerun the study to retry them")
    return study_dir


def _any_result(study_dir: Path) -> bool:
    return any(study_dir.glob("*/result.json"))


def run_finals(configs: list[RunConfig], executor: ExecutorSpec, progress: Progress, score_val: bool = True
               ) -> list[str]:
    """Run the configs on the executor, each in its own process; the names of the runs that failed (a run that
    cannot run here is listed in the report, not counted as a failure). `score_val=False`: configs chosen on val,
    whose val is not scored again."""
    tasks = [RunTask.of(c, score_val=score_val) for c in configs]
    units = {c.name: job_units(c) for c in configs}

    def events(event: str, task: RunTask, result: RunResult | None) -> None:
        if event == "start":
            progress.start(f"{task.name} started")
            return
        if result.status == "done":
            print(f"run {task.name} done in {result.wall_seconds or 0:.0f} s", flush=True)
        elif result.status == "stopped":  # the study stops too: the run's own line says where it can go on from
            print(result.reason, flush=True)
        else:
            what = "not run here" if result.status == "not_run" else result.status
            print(f"run {task.name} {what}: {result.reason}; continuing", flush=True)
        progress.end(units[task.name], f"{task.name} {result.status.replace('_', ' ')}")

    results = run_all(executor, tasks, events)
    return [r.name for r in results if r.status in ("failed", "stopped")]


def study_stopped(stop: Stopped, configs: list[RunConfig], repeats: Repeats) -> Stopped:
    """The study's one line for a stop: how many of its runs are finished, and how to go on."""
    finals = [f for c in configs for f in repeat_configs(c, repeats)]
    done = sum(has_result(f.run_dir) for f in finals)
    return Stopped(stop.signum, f"study stopped by {signal_name(stop.signum)}; {done} of {len(finals)} runs "
                                "finished; rerun the same command to resume")


def run_decision(configs: list[RunConfig], spec: TuneSpec | None, repeats: Repeats, study_dir: Path,
                 metric: str | None, executor: ExecutorSpec) -> list[str]:
    """Tune each method on val, then run every method's chosen config per seed/fold on the executor: all together,
    or in racing rounds; write study.json; returns the failed run names."""
    progress = Progress(sum(plan_units(c, spec, repeats, study_dir) for c in configs))
    finals = [f for c in configs for f in repeat_configs(c, repeats)]
    left = sum(not has_result(f.run_dir) for f in finals)
    tuned = sum(spec is not None and (study_dir / "tune" / c.name / CHOSEN).is_file() for c in configs)
    print(f"study {study_dir}: {len(configs)} methods, {tuned} already tuned; {len(finals)} final runs, "
          f"{len(finals) - left} already done, {left} to run", flush=True)
    manifest = study_dir / MANIFEST
    # `--only` runs some methods: the others stay in the manifest, and in the decision.
    groups: dict = read_json(manifest)["groups"] if manifest.is_file() else {}
    repeated: dict[str, list[RunConfig]] = {}
    for cfg in configs:
        chosen = {"params": {}, "value": None, "trials": 0}
        if spec is not None:
            chosen = tune_run(tuning_config(cfg, repeats), spec, study_dir / "tune" / cfg.name, executor,
                              progress.events(cfg.name, trial_units(cfg)))
            print(f"{cfg.name}: chosen {chosen['params'] or '(no knobs)'} val {chosen['value']}", flush=True)
        repeated[cfg.name] = repeat_configs(chosen_config(cfg, chosen), repeats)
        groups[cfg.name] = {"method": cfg.method.name, "runs": [f.name for f in repeated[cfg.name]], "chosen": chosen}
        write_json(manifest, {"metric": metric, "repeats": vars_repeats(repeats), "groups": groups})
    # Tuned configs were chosen on val: their final runs are scored on test only.
    score_val = spec is None
    if repeats.race:
        return race_finals(repeated, groups, repeats, study_dir, metric, executor, progress, score_val)
    todo = [f for fs in repeated.values() for f in fs if not has_result(f.run_dir)]  # a rerun skips finished ones
    return run_finals(todo, executor, progress, score_val)


def race_finals(repeated: dict[str, list[RunConfig]], groups: dict, repeats: Repeats, study_dir: Path,
                metric: str | None, executor: ExecutorSpec, progress: Progress, score_val: bool = True) -> list[str]:
    """The final runs in rounds: round k is repeat k (seed or fold) of every method still racing. After each round,
    a method significantly worse than the leader (`report.decision.race`) gets no more repeats; study.json records
    when and why, and what that saved. A rerun recomputes the same stops from the same finished runs."""
    failures, skipped = [], []
    for k in range(repeats.rounds):
        racing = [name for name in repeated if "raced_out" not in groups[name]]
        todo = [repeated[n][k] for n in racing if k < len(repeated[n]) and not has_result(repeated[n][k].run_dir)]
        failures += run_finals(todo, executor, progress, score_val)
        if k == repeats.rounds - 1:
            break
        for out in race(study_dir, k + 1, repeats.alpha, metric):
            rest = repeated[out.name][k + 1:]
            groups[out.name].update(raced_out=asdict(out), runs=[f.name for f in repeated[out.name][:k + 1]])
            skipped += rest
            why = f"{out.diff:+.3f} vs {out.leader}, Holm p {out.p_holm:.3f}"
            progress.advance(sum(job_units(f) for f in rest), f"{out.name} raced out after round {k + 1}: {why}")
        write_json(study_dir / MANIFEST, {"metric": metric, "repeats": vars_repeats(repeats), "groups": groups})
    every = [f for fs in repeated.values() for f in fs]
    saved = {"alpha": repeats.alpha, "rounds": repeats.rounds, "saved_runs": len(skipped), "total_runs": len(every),
             "saved_share": sum(map(job_units, skipped)) / max(1e-9, sum(map(job_units, every)))}
    write_json(study_dir / MANIFEST, {"metric": metric, "repeats": vars_repeats(repeats), "groups": groups,
                                      "race": saved})
    return failures
