"""`peftlab probe RUN`: the brittleness probe on a finished run folder, with the run's own config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from peftlab.core.config import check_limit
from peftlab.core.files import ensure_writable
from peftlab.core.result import read_result, run_config, write_result
from peftlab.data.splits import load_splits
from peftlab.experiments.brittleness import probe_split
from peftlab.recipes.saved_run import load_run


def run_probe(run_dir: Path, limit: int | None = None) -> dict:
    """`peftlab probe RUN_DIR`: probe a finished run (any method kind) and add the probe's keys to its result.json."""
    run_dir = Path(run_dir)
    check_limit(limit)
    cfg = run_config(run_dir)
    # Both are needed after the probe: a result.json that cannot be read or a folder that cannot be written is
    # refused before the model loads, not after every prompt has been perturbed and scored.
    result = read_result(run_dir, fix="train the run again")
    ensure_writable(run_dir, "copy the run folder somewhere writable and probe the copy")
    if limit is not None:
        cfg.experiments.probe_limit = limit
    run = load_run(run_dir, cfg=cfg)  # a vision-language run keeps its images in the probe
    splits = load_splits(cfg.data, run.task, val_in_train=not run.method.trains)  # the demo pool the run itself had
    metrics = probe_split(cfg, run.method, run.model, run.fmt, run.task, splits, run_dir)
    write_result(run_dir, replace(result, metrics={**result.metrics, **metrics}))
    return metrics
