"""The runs of a study folder, read back for its report.

A study folder holds one sub-folder per run, each written by the run writer:
``result.json`` (required), ``train_log.jsonl`` and ``predictions.jsonl`` (both optional).
Everything here only reads those files, so a report can be rebuilt at any time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from peftlab.core.errors import PeftlabError
from peftlab.core.result import has_result, read_result


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping blank or unparsable lines.

    A run killed mid-write leaves a truncated last line; the rest of the log is still worth plotting.
    """
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def load_results(study_dir: Path) -> pd.DataFrame:
    """Load every ``<study_dir>/<run>/result.json`` into one row per run, sorted by trainable params.

    ``metrics`` is flattened into top-level columns (``test_accuracy``, ``flip_rate``, ...); ``run_dir`` holds the
    folder name so logs and predictions can be found again. Folders without ``result.json`` are skipped.
    A run folder itself (holding ``result.json``) loads as a one-row table.
    """
    rows = []
    study_dir = Path(study_dir)
    # A single run folder (`peftlab train`) reports as a one-run study.
    runs = [study_dir] if has_result(study_dir) else sorted(study_dir.iterdir())
    for run_dir in (p for p in runs if has_result(p)):
        result = read_run_result(run_dir)
        row = {k: v for k, v in result.items() if k != "metrics"}
        # Top-level fields win over a same-named metric so the cost columns keep their meaning.
        for key, value in (result.get("metrics") or {}).items():
            row.setdefault(key, value)
        row["name"] = row.get("name") or run_dir.name
        row["run_dir"] = run_dir.relative_to(study_dir).as_posix()  # "." for a lone run folder
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if "trainable_params" not in df:
        df["trainable_params"] = float("nan")
    # Stable sort with the name as tie-breaker: zero-shot and few-shot both have 0 trainable params.
    return df.sort_values(["trainable_params", "name"], na_position="last", kind="stable").reset_index(drop=True)


def read_run_result(run_dir: Path) -> dict:
    """A run's result.json as a flat mapping (`core.result.RunResult`'s fields); one cut off or overwritten is one
    line naming it, not a traceback."""
    return read_result(run_dir, fix="delete it and rerun that run, or move its folder out of the study").to_dict()


def require_runs(study_dir: Path) -> pd.DataFrame:
    """`load_results`, refusing a folder without a single finished run (there is nothing to report)."""
    df = load_results(study_dir)
    if df.empty:
        raise PeftlabError(f"{study_dir}: no run folder with a result.json here; give a study folder (or a run "
                           "folder) that holds finished runs")
    return df


def is_missing(value: Any) -> bool:
    """True for a value a run did not report: None, or NaN where pandas filled a column in."""
    return value is None or (isinstance(value, float) and math.isnan(value))
