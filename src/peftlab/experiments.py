"""Post-training experiments a run config can switch on (`experiments:`): forgetting and brittleness probes.

`train._finish` calls `run_experiments` once, after the test evaluation; the returned keys join
`result.json["metrics"]`, so they show up as extra columns in a study's results table.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.config import RunConfig
from peftlab.data import PromptFormat
from peftlab.tasks import Example, Task


def run_experiments(
    cfg: RunConfig, model, fmt: PromptFormat, task: Task, splits: dict[str, list[Example]], run_dir: Path
) -> dict[str, float]:
    """Run the configured probes on the trained `model`; returns flat metrics (empty when none is configured)."""
    ex = cfg.experiments
    metrics: dict[str, float] = {}
    if ex.forgetting or ex.general_text:
        from peftlab.forgetting import forgetting_metrics

        metrics.update(forgetting_metrics(cfg, model, fmt))
    if ex.probe:
        from peftlab.probe import probe_split

        metrics.update(probe_split(cfg, model, fmt, task, splits, run_dir))
    return metrics
