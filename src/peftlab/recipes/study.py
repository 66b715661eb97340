"""Study files: a shared `base` run config, a list of `runs`, optional `grids` crossed into runs, and the sections
of the experiments built on studies (`sweep`, `tune`, `repeats`, `metric`, teachers).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.core.config import set_dotted
from peftlab.core.errors import PeftlabError
from peftlab.core.yamlio import describe, read_yaml

STUDY_KEYS = {"name", "output_dir", "base", "runs", "grids", "select_teacher", "teachers", "sweep", "tune", "repeats",
              "metric", "executor"}


@dataclass
class StudyRun:
    name: str
    raw: dict = field(default_factory=dict)


@contextmanager
def naming(path: Path, what: str = "") -> Iterator[None]:
    """A `PeftlabError` raised inside names the study file (and `what`, e.g. "run 'lora'") it comes from."""
    try:
        yield
    except PeftlabError as err:
        if not str(err).startswith(f"{path}:"):
            err.args = (f"{path}: {what + ': ' if what else ''}{err}",)
        raise


def _expect(value: Any, kind: type | tuple[type, ...], where: str, expected: str) -> Any:
    if not isinstance(value, kind):
        raise PeftlabError(f"{where}: expected {expected}, got {describe(value)}")
    return value


def _expand_grid(grid: Any, where: str) -> list[StudyRun]:
    _expect(grid, dict, where, "a mapping {name, params: {config.key: [values, ...]}, config?}")
    name = _expect(grid.get("name"), str, f"{where}.name", "the grid's name (text)")
    params = _expect(grid.get("params") or {}, dict, f"{where}.params", "a mapping {config.key: [values, ...]}")
    for key, values in params.items():
        _expect(values, list, f"{where}.params.{key}", "a list of values")
    base = _expect(grid.get("config") or {}, dict, f"{where}.config", "a mapping (a run config)")
    keys = list(params)
    runs = []
    for values in itertools.product(*(params[k] for k in keys)):
        raw = copy.deepcopy(base)
        for key, value in zip(keys, values, strict=True):  # the values as read: no round trip through YAML text
            set_dotted(raw, str(key), value, f"{where}.params.{key}")
        label = "-".join(f"{str(k).rsplit('.', 1)[-1]}{v}" for k, v in zip(keys, values, strict=True))
        runs.append(StudyRun(f"{name}-{label}" if label else name, raw))
    return runs


def _study_run(raw: Any, where: str) -> StudyRun:
    run = dict(_expect(raw, dict, where, "a mapping (a run config, e.g. {method: {name: lora}})"))
    method = run.get("method")
    name = run.pop("name", None) or (method.get("name") if isinstance(method, dict) else None) or "run"
    return StudyRun(_expect(name, str, f"{where}.name", "the run's name (text)"), run)


def _check_header(raw: dict) -> None:
    for key in ("name", "output_dir", "metric"):
        if raw.get(key) is None:
            raw.pop(key, None)  # `name:` left empty is no name: the file's stem, as when the key is absent
        else:
            _expect(raw[key], str, key, "text")
    raw["base"] = _expect(raw.get("base") or {}, dict, "base", "a mapping (the run config every run starts from)")
    for key in ("runs", "grids"):
        _expect(raw.get(key) or [], list, key, f"a list of {key} (each a mapping)")


def load_study(path: Path) -> tuple[dict, list[StudyRun]]:
    """Parse a study YAML into its header and the runs it expands to (none for a sweep, which has only a base).

    Its shape is checked here, before any folder is made: a study that is empty, a list, or holds a list where a
    mapping belongs is an error naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"{path}: no such study file")
    raw = read_yaml(path)
    if raw is None:
        raise PeftlabError(f"{path}: empty study; expected a mapping with base: and runs: (see examples/)")
    if not isinstance(raw, dict):
        raise PeftlabError(f"{path}: expected a study mapping (name, base, runs, ...), got {describe(raw)}")
    unknown = sorted(map(str, set(raw) - STUDY_KEYS))
    if unknown:
        raise PeftlabError(f"{path}: unknown study key '{unknown[0]}'; valid: {', '.join(sorted(STUDY_KEYS))}")
    with naming(path):
        _check_header(raw)
        runs = [_study_run(r, f"runs[{i}]") for i, r in enumerate(raw.get("runs") or [])]
        for i, grid in enumerate(raw.get("grids") or []):
            runs += _expand_grid(grid, f"grids[{i}]")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise PeftlabError(f"{path}: run names must be unique, got {names}")
    return raw, runs
