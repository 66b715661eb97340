"""Notes under a study's results table: runs that could not run here, and the memory QLoRA saved.

A run that raises `NotSupported` (bitsandbytes missing, a method peft cannot run on the model) writes
`<run>/not_run.json` with the reason, and the study goes on. The table then lists it under "Not run", so a missing
row is explained rather than silently absent. A QLoRA run is compared with the LoRA run on the same model and task:
peak GPU memory allocated where both ran on a GPU, else peak resident memory (RSS) of the process.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pandas as pd

from peftlab.core.files import write_json
from peftlab.core.result import has_result
from peftlab.report.decision import unpaired_note

NOT_RUN = "not_run.json"


def write_not_run(cfg, reason: str) -> Path:
    """Record why a run could not run on this machine."""
    path = cfg.run_dir / NOT_RUN
    write_json(path, {"name": cfg.name, "method": cfg.method.name, "reason": reason})
    return path


def not_run(study_dir: Path) -> list[dict]:
    """The recorded not-run runs of a study (a run that finished since is not listed)."""
    rows = []
    for path in sorted(Path(study_dir).glob(f"*/{NOT_RUN}")):
        if not has_result(path.parent):
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not math.isnan(value) else None


def memory_notes(df: pd.DataFrame) -> list[str]:
    """One sentence per QLoRA run: its peak memory against the LoRA run on the same model and task."""
    if df.empty or "method" not in df:
        return []
    notes = []
    records = df.to_dict("records")
    for q in (r for r in records if r.get("method") == "qlora"):
        candidates = [r for r in records if r.get("method") == "lora" and r.get("model") == q.get("model")
                      and r.get("task") == q.get("task")]
        if not candidates:
            continue
        # Several LoRA runs (other budgets): the one named like this run, "qlora-x" -> "lora-x", else the first.
        twin = str(q["name"]).replace("qlora", "lora")
        lora = next((r for r in candidates if r["name"] == twin), candidates[0])
        gpu = _number(q.get("peak_gpu_mb")), _number(lora.get("peak_gpu_mb"))
        kind, (mine, theirs) = ("peak GPU memory allocated", gpu) if None not in gpu else (
            "peak RSS", (_number(q.get("peak_rss_mb")), _number(lora.get("peak_rss_mb"))))
        if mine is None or theirs is None or theirs <= 0:
            continue
        saved = theirs - mine
        weights = _number(q.get("weights_mb")), _number(lora.get("weights_mb"))
        notes.append(
            f"{q['name']} (qlora) against {lora['name']} (LoRA over the unquantized base): {kind} "
            f"{mine:,.0f} MB vs {theirs:,.0f} MB, {abs(saved):,.0f} MB ({100 * abs(saved) / theirs:.0f}%) "
            f"{'less' if saved >= 0 else 'more'}"
            + (f"; weights {weights[0]:,.0f} MB vs {weights[1]:,.0f} MB." if None not in weights else ".")
        )
    return notes


PRECISION_TITLES = {"precision": "Training precision", "scoring_precision": "Scoring precision"}


def precision_notes(df: pd.DataFrame, column: str = "precision") -> list[str]:
    """What the runs computed in, grouped: "fp32 (measured: bf16 0.93x fp32 ...): lora, pt". `column`: "precision"
    (training) or "scoring_precision" (test scoring and generation)."""
    if df.empty or column not in df:
        return []
    groups: dict[str, list[str]] = {}
    for row in df.to_dict("records"):
        choice = row.get(column)
        if isinstance(choice, dict) and choice.get("autocast"):
            groups.setdefault(f"{choice['autocast']} ({choice.get('source')}: {choice.get('reason')})",
                              []).append(str(row["name"]))
    return [f"{what}: {', '.join(names)}" for what, names in groups.items()]


def notes_markdown(study_dir: Path, df: pd.DataFrame) -> str:
    """Markdown to append under the results table (empty when there is nothing to note)."""
    parts = []
    unpaired = unpaired_note(study_dir)
    if unpaired:
        parts.append(f"Warning: {unpaired}\n")
    skipped = not_run(study_dir)
    if skipped:
        parts.append("Not run here:\n\n" + "".join(f"- {r['name']} ({r['method']}): {r['reason']}\n" for r in skipped))
    memory = memory_notes(df)
    if memory:
        parts.append("Memory:\n\n" + "".join(f"- {line}\n" for line in memory))
    for column, title in PRECISION_TITLES.items():
        lines = precision_notes(df, column)
        if lines:
            parts.append(f"{title}:\n\n" + "".join(f"- {line}\n" for line in lines))
    return "".join(f"\n{p}" for p in parts)


def notes_html(study_dir: Path, df: pd.DataFrame) -> str:
    """The same notes as HTML for the report's results section."""
    parts = []
    unpaired = unpaired_note(study_dir)
    if unpaired:
        parts.append(f'<p class="warning"><b>Warning</b>: {html.escape(unpaired)}</p>')
    skipped = not_run(study_dir)
    if skipped:
        items = "".join(f"<li><b>{html.escape(r['name'])}</b> ({html.escape(r['method'])}): "
                        f"{html.escape(r['reason'])}</li>" for r in skipped)
        parts.append(f'<p><b>Not run here</b></p><ul class="not-run">{items}</ul>')
    memory = memory_notes(df)
    if memory:
        parts.append("<p><b>Memory</b></p><ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in memory) + "</ul>")
    for column, title in PRECISION_TITLES.items():
        lines = precision_notes(df, column)
        if lines:
            parts.append(f"<p><b>{title}</b></p><ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in lines)
                         + "</ul>")
    return "\n".join(parts)
