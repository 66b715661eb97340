"""The study's comparison table: one row per run, written as results.csv (raw) and results.md (for reading)."""

from __future__ import annotations

import dataclasses
from numbers import Number
from pathlib import Path
from typing import Any

import pandas as pd

from peftlab.core.files import write_text_atomic
from peftlab.core.result import RunResult
from peftlab.report.decision import decision_markdown
from peftlab.report.notes import notes_markdown
from peftlab.report.study_runs import is_missing, require_runs

MISSING = "–"

# (display name, result column, format spec, scale) for the fixed part of the table.
_BASE_COLUMNS: list[tuple[str, str, str, float]] = [
    ("trainable params", "trainable_params", ",.0f", 1.0),
    ("trainable %", "trainable_pct", ".4g", 1.0),
    ("adapter MB", "adapter_bytes", ".2f", 1e-6),
    ("train steps", "train_steps", ",.0f", 1.0),
    ("train loss", "last_train_loss", ".4f", 1.0),
    ("val loss", "best_val_loss", ".4f", 1.0),
    ("test n", "test_n", ",.0f", 1.0),
]
_COST_COLUMNS: list[tuple[str, str, str, float]] = [
    ("time (s)", "train_seconds", ",.1f", 1.0),
    ("tokens/s", "tokens_per_s", ",.0f", 1.0),
    ("peak mem (MB)", "peak_rss_mb", ",.0f", 1.0),
]
# Top-level result.json fields (`core.result.RunResult`); any other flattened column came from `metrics`.
_RESULT_FIELDS = {f.name for f in dataclasses.fields(RunResult)} | {"run_dir"}
# Test bookkeeping shown elsewhere (test n) or not a quality number.
_NOT_METRICS = {"test_n", "test_truncated_examples"}


def _is_scalar_column(series: pd.Series) -> bool:
    """True when every value is a number, a string or missing (i.e. not a confusion matrix or label list)."""
    values = [v for v in series if not is_missing(v)]
    return bool(values) and all(isinstance(v, (Number, str)) for v in values)


def format_cell(value: Any, spec: str, scale: float = 1.0) -> str:
    """One value as the table shows it: numbers scaled and formatted with `spec`, missing ones as "–"."""
    if is_missing(value):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, Number):
        return str(value)
    return format(value * scale, spec)


def _metric_columns(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Scalar test metric columns and extra experiment columns (other scalar metric keys), in order of appearance."""
    scalar = [k for k in df.columns if k not in _RESULT_FIELDS and _is_scalar_column(df[k])]
    tests = [k for k in scalar if k.startswith("test_") and k not in _NOT_METRICS]
    # Validation metrics are summarised by "val loss"; everything else is an experiment-specific extra.
    extras = [k for k in scalar if not k.startswith(("test_", "val_"))]
    return tests, extras


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """Human-readable comparison table: one row per run, every cell a string, missing values as "–"."""
    tests, extras = _metric_columns(df)
    specs = [("run", "name", "s", 1.0), ("method", "method", "s", 1.0), *_BASE_COLUMNS]
    specs += [(k.removeprefix("test_"), k, ".4f", 1.0) for k in tests]
    specs += _COST_COLUMNS + [(k, k, ".4f", 1.0) for k in extras]
    if "peak_gpu_mb" in df and df["peak_gpu_mb"].notna().any():  # only where some run used a GPU
        specs.insert(len(specs) - len(extras), ("peak GPU (MB)", "peak_gpu_mb", ",.0f", 1.0))
    table = {}
    for label, column, spec, scale in specs:
        values = df[column] if column in df else [None] * len(df)
        table[label] = [format_cell(v, spec, scale) for v in values]
    return pd.DataFrame(table, columns=[s[0] for s in specs])


def _markdown(table: pd.DataFrame) -> str:
    """Render a string table as GitHub markdown by hand, so `tabulate` is not a dependency."""

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(list(table.columns)), row(["---"] * len(table.columns))]
    lines += [row(list(values)) for values in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_tables(study_dir: Path, decision: dict | None = None) -> tuple[Path, Path]:
    """Write ``results.csv`` (raw scalar columns) and ``results.md`` (display table) into the study folder.

    With a `decision` (see `report.decision`), results.md opens with its verdict and interval table.
    """
    study_dir = Path(study_dir)
    df = require_runs(study_dir)
    # Nested values (confusion matrix, labels, versions) do not fit a CSV cell; they stay in result.json.
    flat = df[[c for c in df.columns if _is_scalar_column(df[c]) or df[c].isna().all()]]
    csv_path, md_path = study_dir / "results.csv", study_dir / "results.md"
    write_text_atomic(csv_path, flat.to_csv(index=False))
    head = decision_markdown(decision) + "\n## Runs\n\n" if decision else ""
    write_text_atomic(md_path, head + _markdown(results_table(df)) + notes_markdown(study_dir, df))
    return csv_path, md_path
