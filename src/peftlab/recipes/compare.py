"""Studies: many runs on the same task, data, split and budget, then one table and one report.

A study YAML has a shared `base` run config, a list of `runs` (each a partial config on top of `base`), and
optional `grids` whose `params` are crossed, e.g. virtual tokens x learning rate. Every run trains in its own
process, so peak memory is measured per run and one crash does not take the study down. A run whose
`result.json` exists is skipped, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftlab.core.config import apply_overrides, deep_merge, load_config, save_config
from peftlab.core.errors import NotSupported, PeftlabError
from peftlab.experiments.distill import prepare_teacher
from peftlab.report.notes import NOT_RUN
from peftlab.report.report import build_study_report


@dataclass
class StudyRun:
    name: str
    raw: dict = field(default_factory=dict)


def _expand_grid(grid: dict) -> list[StudyRun]:
    params = grid.get("params") or {}
    keys = list(params)
    runs = []
    for values in itertools.product(*(params[k] for k in keys)):
        raw = apply_overrides(
            yaml.safe_load(yaml.safe_dump(grid.get("config", {}))) or {},
            [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in zip(keys, values, strict=True)],
        )
        label = "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in zip(keys, values, strict=True))
        runs.append(StudyRun(f"{grid['name']}-{label}" if label else grid["name"], raw))
    return runs


def load_study(path: Path) -> tuple[dict, list[StudyRun]]:
    """Parse a study YAML into its header and the runs it expands to."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"{path}: no such study file")
    raw = yaml.safe_load(path.read_text()) or {}
    valid = {"name", "output_dir", "base", "runs", "grids", "select_teacher", "teachers", "sweep"}
    unknown = set(raw) - valid
    if unknown:
        raise PeftlabError(f"{path}: unknown study key '{sorted(unknown)[0]}'; valid: {', '.join(sorted(valid))}")
    runs = [StudyRun(r.pop("name", None) or r.get("method", {}).get("name", "run"), r) for r in raw.get("runs", [])]
    for grid in raw.get("grids", []):
        runs += _expand_grid(grid)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise PeftlabError(f"{path}: run names must be unique, got {names}")
    return raw, runs


def run_study(path: Path, overrides: list[str] = (), only: list[str] | None = None) -> Path:
    """Run every run of a study that is not finished yet, then write results.md/csv and report.html."""

    header, runs = load_study(path)
    study_dir = Path(header.get("output_dir", "runs")) / header.get("name", Path(path).stem)
    study_dir.mkdir(parents=True, exist_ok=True)
    configs = []
    for run in runs:  # resolve every config first: a typo fails the study before hours of training
        raw = deep_merge(header.get("base", {}), run.raw)
        raw.update(name=run.name, output_dir=str(study_dir))
        configs.append(load_config(None, overrides, base=raw))
    if header.get("teachers") or header.get("select_teacher"):  # distillation: rank teachers, write teacher.jsonl

        prepare_teacher(header, configs, study_dir)
    todo = [c for c in configs if (only is None or c.name in only) and not (c.run_dir / "result.json").exists()]
    print(f"study {study_dir}: {len(configs)} runs, {len(configs) - len(todo)} already done, {len(todo)} to run")
    failures = []
    for i, cfg in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {cfg.name} ({cfg.method.name})", flush=True)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / NOT_RUN).unlink(missing_ok=True)  # retried: the machine may have what it lacked last time
        save_config(cfg, cfg.run_dir / "config.yaml")
        t0 = time.perf_counter()
        # --resume: a run killed mid-training continues from its last checkpoint instead of step 0.
        proc = subprocess.run(
            [sys.executable, "-m", "peftlab", "train", str(cfg.run_dir / "config.yaml"), "--resume"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if proc.returncode == NotSupported.exit_code:  # the run wrote not_run.json; the report lists it
            print(f"run {cfg.name} not run here (see the message above); continuing", flush=True)
        elif proc.returncode != 0:
            failures.append(cfg.name)
            print(f"run {cfg.name} failed (exit {proc.returncode}); continuing", flush=True)
        else:
            print(f"run {cfg.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    report = build_study_report(study_dir, title=header.get("name"))
    print(f"results: {study_dir / 'results.md'}\nreport:  {report}")
    if failures:
        raise PeftlabError(f"{len(failures)} run(s) failed: {', '.join(failures)}; rerun the study to retry them")
    return study_dir
