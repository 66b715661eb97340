"""The study report's figures, each rendered to an embedded PNG ``<img>`` so the page needs no other file."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from numbers import Number
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from peftlab.report.study_runs import is_missing, read_jsonl
from peftlab.report.tables import format_cell


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "run"


def embed_png(fig: Figure, plot_id: str, alt: str) -> str:
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


def loss_curves(df: pd.DataFrame, study_dir: Path) -> str:
    """Small multiples, one per run: losses of different methods differ in scale, so shared axes would hide detail."""
    logs = {row.name: read_jsonl(study_dir / row.run_dir / "train_log.jsonl") for row in df.itertuples()}
    logs = {name: log for name, log in logs.items() if log}
    if not logs:
        return "<p>No run has a training log (e.g. zero-shot only).</p>"
    fig, axes = _grid(len(logs))
    for ax, (name, log) in zip(axes, logs.items(), strict=True):
        train = [(r["step"], r["loss"]) for r in log if not is_missing(r.get("loss")) and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in log if not is_missing(r.get("val_loss")) and "step" in r]
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], lw=1.2, label="train loss")
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o", color="tab:red", label="val loss")
        ax.set(title=name, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return embed_png(fig, "loss-curves", "Training loss vs step per run, validation loss as red markers")


def metric_vs_params(df: pd.DataFrame) -> str:
    """Quality vs size: one panel per primary metric, because a study may mix tasks with different metrics."""
    points: dict[str, list[tuple[float, float, str]]] = {}
    for row in df.to_dict("records"):
        metric = row.get("primary_metric")
        value = row.get(f"test_{metric}")
        if metric and not is_missing(value) and isinstance(value, Number):
            params = 0 if is_missing(row.get("trainable_params")) else row["trainable_params"]
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
    return embed_png(fig, "metric-vs-params", "Primary test metric against trainable parameters, log x axis")


def cost_bars(df: pd.DataFrame, column: str, xlabel: str, plot_id: str) -> str:
    """One horizontal bar per run for a cost column (train time, peak memory), in the table's order."""
    names = list(df["name"])
    values = [v if isinstance(v, Number) and not is_missing(v) else 0.0 for v in df.get(column, [None] * len(df))]
    fig = Figure(figsize=(7.0, 0.45 * len(names) + 1.2), layout="constrained")
    ax = fig.subplots()
    # Positions, not names, on the axis: duplicate run names would otherwise be merged into one bar.
    bars = ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    labels = [format_cell(v, ",.1f") for v in df.get(column, [None] * len(df))]
    ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
    ax.invert_yaxis()  # keep the table's order, top to bottom
    ax.set(xlabel=xlabel)
    ax.grid(alpha=0.3, axis="x")
    return embed_png(fig, plot_id, f"{xlabel} per run")


def confusion_matrices(df: pd.DataFrame) -> str:
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
        parts.append(embed_png(fig, f"confusion-{row['name']}", f"Test confusion matrix for {row['name']}"))
    return "\n".join(parts)
