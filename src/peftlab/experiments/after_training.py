"""Post-training experiments a run config can switch on (`experiments:`): forgetting and brittleness probes.

The training recipe (`recipes.train_run.finish`) calls `run_experiments` once, after the test evaluation; the returned
keys join
`result.json["metrics"]`, so they show up as extra columns in a study's results table.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.core.config import RunConfig
from peftlab.data.tasks import Example, Task
from peftlab.experiments.brittleness import probe_split
from peftlab.experiments.forgetting import forgetting_metrics
from peftlab.methods.registry import Method
from peftlab.prompts.format import PromptFormat


def run_experiments(
    cfg: RunConfig, method: Method, model, fmt: PromptFormat, task: Task, splits: dict[str, list[Example]],
    run_dir: Path,
) -> dict[str, float]:
    """Run the configured probes on `model`, trained by `method`; returns flat metrics (empty when none is
    configured)."""
    ex = cfg.experiments
    metrics: dict[str, float] = {}
    if ex.forgetting or ex.general_text:
        metrics.update(forgetting_metrics(cfg, method, model, fmt))
    if ex.probe:
        metrics.update(probe_split(cfg, method, model, fmt, task, splits, run_dir))
    return metrics
