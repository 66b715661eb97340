"""A study's whole report in one call: peft's per-run JSON, the decision, the tables and the HTML page.

What each file holds is built elsewhere in `peftlab.report`: `study_runs` reads the run folders, `tables` writes
results.csv and results.md, `figures` draws the plots and `html_report` writes report.html.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.core.result import has_result
from peftlab.report.decision import write_decision
from peftlab.report.html_report import write_report
from peftlab.report.peft_result import write_peft_result
from peftlab.report.study_runs import read_run_result
from peftlab.report.tables import write_tables


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
