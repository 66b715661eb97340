"""Study files: a shared `base` run config, a list of `runs`, optional `grids` crossed into runs, and the sections
of the experiments built on studies (`sweep`, `tune`, `repeats`, `metric`, teachers).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftlab.core.config import apply_overrides
from peftlab.core.errors import PeftlabError

STUDY_KEYS = {"name", "output_dir", "base", "runs", "grids", "select_teacher", "teachers", "sweep", "tune", "repeats",
              "metric"}


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
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise PeftlabError(f"{path}: unknown study key '{sorted(unknown)[0]}'; valid: {', '.join(sorted(STUDY_KEYS))}")
    runs = [StudyRun(r.pop("name", None) or r.get("method", {}).get("name", "run"), r) for r in raw.get("runs", [])]
    for grid in raw.get("grids", []):
        runs += _expand_grid(grid)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise PeftlabError(f"{path}: run names must be unique, got {names}")
    return raw, runs
