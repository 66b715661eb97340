"""The study's ``report.html``: one self-contained page (inline CSS, figures as base64 PNG) comparing its runs."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from peftlab.core.files import write_text_atomic
from peftlab.report.decision import decision_html, pareto_figure
from peftlab.report.figures import confusion_matrices, cost_bars, embed_png, loss_curves, metric_vs_params
from peftlab.report.notes import notes_html
from peftlab.report.study_runs import is_missing, read_jsonl, require_runs
from peftlab.report.tables import format_cell, results_table

PROMPT_CHARS = 300
N_EXAMPLES = 3


def _examples(df: pd.DataFrame, study_dir: Path) -> str:
    """The first few test ids shared by the runs of each task, every run's prediction side by side."""
    blocks = []
    for task, group in df.groupby(df.get("task", pd.Series([""] * len(df))).fillna(""), sort=False):
        preds = {}
        for row in group.itertuples():
            lines = read_jsonl(study_dir / row.run_dir / "predictions.jsonl")
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
        score = format_cell(pred.get("score"), ".3f")
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
    tasks = sorted({str(t) for t in df.get("task", []) if not is_missing(t)})
    models = sorted({str(m) for m in df.get("model", []) if not is_missing(m)})
    if not tasks:
        return f"PEFT study: {study_dir.name}"
    return f"PEFT study: {', '.join(tasks)}" + (f" on {', '.join(models)}" if models else "")


def write_report(study_dir: Path, title: str | None = None, decision: dict | None = None) -> Path:
    """Write a self-contained ``report.html`` (inline CSS, figures as base64 PNG) into the study folder.

    With a `decision`, the page opens with the verdict, the interval table and the Pareto plot.
    """
    study_dir = Path(study_dir)
    df = require_runs(study_dir)
    title = title or _title(df, study_dir)
    table = results_table(df).to_html(index=False, escape=True, classes="results", border=0)
    table += notes_html(study_dir, df)  # runs that could not run here, memory QLoRA saved
    costs = cost_bars(df, "train_seconds", "train time (s)", "train-time")
    costs += cost_bars(df, "peak_rss_mb", "peak memory (MB)", "peak-memory")
    sections = [
        ("Verdict", decision_html(decision, embed_png(pareto_figure(decision), "pareto", "Test metric against each "
                                                      "cost with 95% intervals; Pareto frontier in red"))
         if decision else ""),
        ("Results", table),
        ("Loss curves", loss_curves(df, study_dir)),
        ("Quality vs trainable parameters", metric_vs_params(df)),
        ("Cost", costs),
        ("Confusion matrices (test)", confusion_matrices(df)),
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
