"""`peftlab probe RUN`: the brittleness probe on a finished run folder, with the run's own config."""

from __future__ import annotations

from pathlib import Path

from peftlab.core.files import read_json, write_json
from peftlab.data.splits import load_splits
from peftlab.experiments.probe import probe_split
from peftlab.methods.saved import load_run, run_config


def run_probe(run_dir: Path, limit: int | None = None) -> dict:
    """`peftlab probe RUN_DIR`: probe a finished run (any method kind) and add the probe's keys to its result.json."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if limit:
        cfg.experiments.probe_limit = limit
    run = load_run(run_dir, cfg=cfg)  # a vision-language run keeps its images in the probe
    splits = load_splits(cfg, run.task, val_in_train=not run.method.trains)  # the demo pool the run itself had
    metrics = probe_split(cfg, run.model, run.fmt, run.task, splits, run_dir)
    result = read_json(run_dir / "result.json")
    result["metrics"] = {**result.get("metrics", {}), **metrics}
    write_json(run_dir / "result.json", result)
    return metrics
