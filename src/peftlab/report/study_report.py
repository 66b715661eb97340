"""Study reports: tables and a self-contained HTML page comparing the runs of one study.

A study folder holds one sub-folder per run, each written by the run writer:
``result.json`` (required), ``train_log.jsonl`` and ``predictions.jsonl`` (both optional).
Everything here only reads those files, so a report can be rebuilt at any time.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import re
from numbers import Number
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_text_atomic
from peftlab.core.result import RunResult, has_result, read_result
from peftlab.report.decision import decision_html, decision_markdown, pareto_figure, write_decision
from peftlab.report.notes import notes_html, notes_markdown
from peftlab.report.peft_result import write_peft_result

MISSING = "–"
PROMPT_CHARS = 300
N_EXAMPLES = 3

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


# ---------------------------------------------------------------------------------------------------------------------
# Loading and tables
# ---------------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_scalar_column(series: pd.Series) -> bool:
    """True when every value is a number, a string or missing (i.e. not a confusion matrix or label list)."""
    values = [v for v in series if not _is_missing(v)]
    return bool(values) and all(isinstance(v, (Number, str)) for v in values)


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if _is_missing(value):
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
        table[label] = [_fmt(v, spec, scale) for v in values]
    return pd.DataFrame(table, columns=[s[0] for s in specs])


def _markdown(table: pd.DataFrame) -> str:
    """Render a string table as GitHub markdown by hand, so `tabulate` is not a dependency."""

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(list(table.columns)), row(["---"] * len(table.columns))]
    lines += [row(list(values)) for values in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _require_runs(study_dir: Path) -> pd.DataFrame:
    df = load_results(study_dir)
    if df.empty:
        raise PeftlabError(f"{study_dir}: no run folder with a result.json here; give a study folder (or a run "
                           "folder) that holds finished runs")
    return df


def write_tables(study_dir: Path, decision: dict | None = None) -> tuple[Path, Path]:
    """Write ``results.csv`` (raw scalar columns) and ``results.md`` (display table) into the study folder.

    With a `decision` (see `report.decision`), results.md opens with its verdict and interval table.
    """
    study_dir = Path(study_dir)
    df = _require_runs(study_dir)
    # Nested values (confusion matrix, labels, versions) do not fit a CSV cell; they stay in result.json.
    flat = df[[c for c in df.columns if _is_scalar_column(df[c]) or df[c].isna().all()]]
    csv_path, md_path = study_dir / "results.csv", study_dir / "results.md"
    write_text_atomic(csv_path, flat.to_csv(index=False))
    head = decision_markdown(decision) + "\n## Runs\n\n" if decision else ""
    write_text_atomic(md_path, head + _markdown(results_table(df)) + notes_markdown(study_dir, df))
    return csv_path, md_path


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "run"


def _img(fig: Figure, plot_id: str, alt: str) -> str:
    """Render a figure to an embedded PNG <img> so the report needs no files besides itself."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" id="plot-{_slug(plot_id)}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.0)) -> tuple[Figure, list[Any]]:
    rows, cols = math.ceil(n / ncols), min(n, ncols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _loss_curves(df: pd.DataFrame, study_dir: Path) -> str:
    """Small multiples, one per run: losses of different methods differ in scale, so shared axes would hide detail."""
    logs = {row.name: _read_jsonl(study_dir / row.run_dir / "train_log.jsonl") for row in df.itertuples()}
    logs = {name: log for name, log in logs.items() if log}
    if not logs:
        return "<p>No run has a training log (e.g. zero-shot only).</p>"
    fig, axes = _grid(len(logs))
    for ax, (name, log) in zip(axes, logs.items(), strict=True):
        train = [(r["step"], r["loss"]) for r in log if not _is_missing(r.get("loss")) and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in log if not _is_missing(r.get("val_loss")) and "step" in r]
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], lw=1.2, label="train loss")
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o", color="tab:red", label="val loss")
        ax.set(title=name, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _img(fig, "loss-curves", "Training loss vs step per run, validation loss as red markers")


def _metric_vs_params(df: pd.DataFrame) -> str:
    """Quality vs size: one panel per primary metric, because a study may mix tasks with different metrics."""
    points: dict[str, list[tuple[float, float, str]]] = {}
    for row in df.to_dict("records"):
        metric = row.get("primary_metric")
        value = row.get(f"test_{metric}")
        if metric and not _is_missing(value) and isinstance(value, Number):
            params = 0 if _is_missing(row.get("trainable_params")) else row["trainable_params"]
            # Log axis cannot show 0: zero/few-shot runs sit at 1 and say so in their label.
            label = row["name"] if params else f"{row['name']} (0 trainable)"
            points.setdefault(metric, []).append((max(params, 1), value, label))
    if not points:
        return "<p>No run reports its primary test metric.</p>"
    fig, axes = _grid(len(points), ncols=2, size=(6.0, 4.2))
    for ax, (metric, pts) in zip(axes, points.items(), strict=True):
        for x, y, label in pts:
            ax.scatter(x, y, s=40)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.margins(0.15)  # room for the labels of the extreme points
        ax.set(xlabel="trainable parameters (log)", ylabel=f"test {metric}", title=f"test {metric} vs size")
        ax.grid(alpha=0.3)
    return _img(fig, "metric-vs-params", "Primary test metric against trainable parameters, log x axis")


def _cost_bars(df: pd.DataFrame, column: str, xlabel: str, plot_id: str) -> str:
    names = list(df["name"])
    values = [v if isinstance(v, Number) and not _is_missing(v) else 0.0 for v in df.get(column, [None] * len(df))]
    fig = Figure(figsize=(7.0, 0.45 * len(names) + 1.2), layout="constrained")
    ax = fig.subplots()
    # Positions, not names, on the axis: duplicate run names would otherwise be merged into one bar.
    bars = ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.bar_label(bars, labels=[_fmt(v, ",.1f") for v in df.get(column, [None] * len(df))], padding=3, fontsize=8)
    ax.invert_yaxis()  # keep the table's order, top to bottom
    ax.set(xlabel=xlabel)
    ax.grid(alpha=0.3, axis="x")
    return _img(fig, plot_id, f"{xlabel} per run")


def _confusion_matrices(df: pd.DataFrame) -> str:
    """One heatmap per classification run, so a collapse onto a single class shows as one bright column."""
    parts = []
    for row in df.to_dict("records"):
        matrix = row.get("test_confusion_matrix")
        if row.get("task_kind") != "classification" or not isinstance(matrix, list) or not matrix:
            continue
        labels = row.get("test_labels")
        labels = labels if isinstance(labels, list) and len(labels) == len(matrix) else list(range(len(matrix)))
        n = len(matrix)
        fig = Figure(figsize=(2.4 + 0.7 * n, 2.0 + 0.7 * n), layout="constrained")
        ax = fig.subplots()
        image = ax.imshow(matrix, cmap="Blues")
        peak = max(max(r) for r in matrix) or 1
        for i, counts in enumerate(matrix):
            for j, count in enumerate(counts):
                ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
        ax.set_xticks(range(n), [str(x) for x in labels], rotation=45, ha="right")
        ax.set_yticks(range(n), [str(x) for x in labels])
        ax.set(xlabel="predicted", ylabel="true", title=row["name"])
        fig.colorbar(image, ax=ax, shrink=0.8)
        parts.append(_img(fig, f"confusion-{row['name']}", f"Test confusion matrix for {row['name']}"))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------------


def _examples(df: pd.DataFrame, study_dir: Path) -> str:
    """The first few test ids shared by the runs of each task, every run's prediction side by side."""
    blocks = []
    for task, group in df.groupby(df.get("task", pd.Series([""] * len(df))).fillna(""), sort=False):
        preds = {}
        for row in group.itertuples():
            lines = _read_jsonl(study_dir / row.run_dir / "predictions.jsonl")
            by_id = {str(p.get("id")): p for p in lines if p.get("split", "test") == "test"}
            if by_id:
                preds[row.name] = by_id
        if not preds:
            continue
        first = next(iter(preds.values()))
        common = [i for i in first if all(i in p for p in preds.values())][:N_EXAMPLES]
        blocks += [_example_block(task, i, preds) for i in common]
    return "\n".join(blocks) or "<p>No predictions shared by the runs.</p>"


def _example_block(task: str, example_id: str, preds: dict[str, dict[str, dict[str, Any]]]) -> str:
    sample = next(iter(preds.values()))[example_id]
    prompt = str(sample.get("prompt", ""))
    prompt = prompt if len(prompt) <= PROMPT_CHARS else prompt[:PROMPT_CHARS] + "…"
    refs = " | ".join(str(r) for r in sample.get("references") or [])
    cards = ""
    for name, by_id in preds.items():
        pred = by_id[example_id]
        score = _fmt(pred.get("score"), ".3f")
        cards += (
            f'<div class="card"><b>{html.escape(name)}</b> <span class="score">score {score}</span>'
            f"<pre>{html.escape(str(pred.get('prediction', '')))}</pre></div>"
        )
    return (
        f'<div class="example"><h3>{html.escape(str(task))} · {html.escape(example_id)}</h3>'
        f"<p><b>Prompt</b></p><pre>{html.escape(prompt)}</pre><p><b>Reference</b>: {html.escape(refs)}</p>"
        f'<div class="cards">{cards}</div></div>'
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table.results { border-collapse: collapse; font-size: 0.85em; display: block; overflow-x: auto; }
table.results th, table.results td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
table.results td { white-space: nowrap; }
table.decision td { white-space: normal; min-width: 4em; }  /* the verdict table wraps its long cells to fit */
table.results th { background: #f0f3f7; } table.results td:nth-child(-n+2) { text-align: left; }
img.plot { max-width: 100%; margin: 0.5em 0.5em 0.5em 0; vertical-align: top; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.5em; margin: 0.3em 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 0.6em; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em; } .score { color: #777; font-size: 0.85em; }
.meta { color: #666; }
"""


def _title(df: pd.DataFrame, study_dir: Path) -> str:
    tasks = sorted({str(t) for t in df.get("task", []) if not _is_missing(t)})
    models = sorted({str(m) for m in df.get("model", []) if not _is_missing(m)})
    if not tasks:
        return f"PEFT study: {study_dir.name}"
    return f"PEFT study: {', '.join(tasks)}" + (f" on {', '.join(models)}" if models else "")


def write_report(study_dir: Path, title: str | None = None, decision: dict | None = None) -> Path:
    """Write a self-contained ``report.html`` (inline CSS, figures as base64 PNG) into the study folder.

    With a `decision`, the page opens with the verdict, the interval table and the Pareto plot.
    """
    study_dir = Path(study_dir)
    df = _require_runs(study_dir)
    title = title or _title(df, study_dir)
    table = results_table(df).to_html(index=False, escape=True, classes="results", border=0)
    table += notes_html(study_dir, df)  # runs that could not run here, memory QLoRA saved
    costs = _cost_bars(df, "train_seconds", "train time (s)", "train-time")
    costs += _cost_bars(df, "peak_rss_mb", "peak memory (MB)", "peak-memory")
    sections = [
        ("Verdict", decision_html(decision, _img(pareto_figure(decision), "pareto", "Test metric against each cost "
                                                 "with 95% intervals; Pareto frontier in red")) if decision else ""),
        ("Results", table),
        ("Loss curves", _loss_curves(df, study_dir)),
        ("Quality vs trainable parameters", _metric_vs_params(df)),
        ("Cost", costs),
        ("Confusion matrices (test)", _confusion_matrices(df)),
        ("Example predictions (test)", _examples(df, study_dir)),
    ]
    body = "\n".join(f"<section><h2>{html.escape(h)}</h2>\n{html_}\n</section>" for h, html_ in sections if html_)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>"
        f'<p class="meta">{len(df)} run(s) in {html.escape(study_dir.name)}</p>\n{body}\n</body></html>\n'
    )
    path = study_dir / "report.html"
    write_text_atomic(path, page)
    return path


def build_study_report(study_dir: Path, title: str | None = None) -> Path:
    """Write results.csv, results.md and report.html for a study; return the report path.

    Every run folder also gets its peft method_comparison JSON (`peft_result.json`); a study of two or more methods
    scored on the same test examples gets decision.json, pareto.png and the verdict on top of both pages.
    """
    study_dir = Path(study_dir)
    runs = [study_dir] if has_result(study_dir) else sorted(p for p in study_dir.iterdir())
    finished = [p for p in runs if has_result(p)]
    for run in finished:  # every result is read once before any file is written: a bad one is one line
        read_run_result(run)
    for run in finished:
        write_peft_result(run)
    decision = write_decision(study_dir) if not has_result(study_dir) else None
    write_tables(study_dir, decision)
    return write_report(study_dir, title, decision)
