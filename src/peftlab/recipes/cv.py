"""k-fold cross-validation of one run config.

PubMedQA's own protocol is 10-fold cross-validation over the 500 trainval questions, reporting the mean and spread
of accuracy and macro-F1; a single 50-question test split moves by ±7 points with the seed. `peftlab cv` runs the
config once per fold (fold k is test, fold k+1 is val, the rest train; see `kfold_examples`), each as an ordinary
run folder under runs/<name>/fold-<k>/, so a killed job resumes at the first unfinished fold and the study report
shows every fold. A method that does not train has no use for val, so that fold joins its demo pool. Folds run
in one process: frozen-feature methods (the linear head) pay for the features once.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from peftlab.core.config import RunConfig
from peftlab.core.errors import PeftlabError
from peftlab.core.files import read_jsonl, write_json, write_text_atomic
from peftlab.core.result import RunResult, has_result, read_result
from peftlab.core.signals import Stopped, signal_name, stop_on_signals
from peftlab.data.metrics import classification_metrics
from peftlab.data.tasks import get_task
from peftlab.recipes.executors import ExecutorSpec, run_all
from peftlab.recipes.runner import RunTask
from peftlab.recipes.train_run import run_training
from peftlab.report.study_report import build_study_report


def _run_folds(todo: list[RunConfig], executor: ExecutorSpec) -> None:
    """The unfinished folds as tasks on the executor; a fold that did not finish is an error naming it."""

    def events(event: str, task: RunTask, result: RunResult | None) -> None:
        print(f"{task.name} {'started' if event == 'start' else result.status.replace('_', ' ')}", flush=True)

    for result in run_all(executor, [RunTask.of(f) for f in todo], events):
        if not result.done:
            raise PeftlabError(f"cross-validation {result.name}: {result.reason}; rerun to retry it")


def _run_here(fold_cfgs: list[RunConfig], todo: list[RunConfig]) -> None:
    """The unfinished folds in this process. A fold stopped by SIGTERM or Ctrl-C goes on from its checkpoint when
    the same command is run again (`peftlab cv` has no --resume: without it the fold would start over)."""
    with stop_on_signals():
        try:
            for k, fold_cfg in enumerate(fold_cfgs):
                if fold_cfg in todo:
                    print(f"fold {k + 1}/{len(fold_cfgs)}", flush=True)
                    run_training(replace(fold_cfg, train=replace(fold_cfg.train, resume=True)))
        except Stopped as stop:
            done = sum(has_result(f.run_dir) for f in fold_cfgs)
            raise Stopped(stop.signum, f"cross-validation stopped by {signal_name(stop.signum)}; {done} of "
                                       f"{len(fold_cfgs)} folds finished; rerun the same command to go on") from None


def fold_config(cfg: RunConfig, fold: int, folds: int) -> RunConfig:
    """The config of one fold: its own run folder inside the study folder runs/<name>/."""
    return replace(
        cfg,
        name=f"fold-{fold}",
        output_dir=str(Path(cfg.output_dir) / cfg.name),
        data=replace(cfg.data, fold=fold, folds=folds),
    )


def summarize(results: list[RunResult], predictions: list[list[dict]], labels: tuple[str, ...] | None) -> dict:
    """Mean and sample standard deviation of every numeric test metric over folds, plus pooled scores.

    Pooled scores treat all folds' test predictions as one set (each example is tested exactly once).
    """
    keys = [k for k, v in results[0].metrics.items() if k.startswith("test_") and isinstance(v, int | float)]
    summary: dict = {"folds": len(results), "metrics": {}}
    for key in keys:
        values = [float(r.metrics[key]) for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary["metrics"][key] = {"mean": statistics.fmean(values), "std": spread, "values": values}
    summary["wall_seconds"] = sum(r.wall_seconds or 0.0 for r in results)
    summary["train_seconds"] = sum(r.train_seconds or 0.0 for r in results)
    if labels:
        rows = [row for fold in predictions for row in fold]
        pooled = classification_metrics([r["prediction"] for r in rows], [r["references"][0] for r in rows], labels)
        summary["pooled"] = pooled
    return summary


def cv_markdown(name: str, summary: dict) -> str:
    """A table of mean ± std per test metric, with the pooled confusion matrix when there is one."""
    lines = [f"# {name}: {summary['folds']}-fold cross-validation", "", "| metric | mean | std | min | max |",
             "|---|---|---|---|---|"]
    for key, s in summary["metrics"].items():
        lines.append(f"| {key} | {s['mean']:.4f} | {s['std']:.4f} | {min(s['values']):.4f} | {max(s['values']):.4f} |")
    lines += ["", f"Wall time over all folds: {summary['wall_seconds']:.0f} s "
                  f"(training/fitting {summary['train_seconds']:.0f} s)."]
    pooled = summary.get("pooled")
    if pooled:
        labels = pooled["labels"]
        lines += ["", f"Pooled over folds: accuracy {pooled['accuracy']:.4f}, macro-F1 {pooled['macro_f1']:.4f}.", "",
                  "| reference \\ prediction | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [f"| {ref} | " + " | ".join(str(c) for c in row) + " |"
                  for ref, row in zip(labels, pooled["confusion_matrix"], strict=True)]
    return "\n".join(lines) + "\n"


def run_cv(cfg: RunConfig, folds: int | None = None, executor: ExecutorSpec | None = None) -> dict:
    """Run (or resume) every fold, then write cv.json, cv.md and the study report into runs/<name>/."""
    folds = folds if folds is not None else cfg.data.folds  # `folds or` ran --folds 0 as the default 10
    if folds < 3:
        raise PeftlabError(f"cross-validation needs at least 3 folds (test, val, train), got {folds}")
    fold_cfgs = [fold_config(cfg, k, folds) for k in range(folds)]
    todo = [f for f in fold_cfgs if not has_result(f.run_dir)]  # finished folds are kept: a rerun resumes
    if executor is None or executor == ExecutorSpec():  # one local worker: here, one fold after another
        _run_here(fold_cfgs, todo)
    else:
        _run_folds(todo, executor)
    results = [read_result(f.run_dir) for f in fold_cfgs]
    predictions = [read_jsonl(f.run_dir / "predictions.jsonl") for f in fold_cfgs]
    task = get_task(cfg.data.task)
    summary = summarize(results, predictions, task.labels if task.kind == "classification" else None)
    study_dir = Path(cfg.output_dir) / cfg.name
    write_json(study_dir / "cv.json", summary)
    write_text_atomic(study_dir / "cv.md", cv_markdown(cfg.name, summary))
    build_study_report(study_dir, f"{cfg.name}: {folds}-fold cross-validation")
    return summary
