"""`peftlab probe RUN`: the brittleness probe on a finished run folder, with the run's own config."""

from __future__ import annotations

from pathlib import Path

import yaml

from peftlab.core.config import RunConfig, from_dict
from peftlab.core.errors import PeftlabError
from peftlab.core.files import read_json, write_json
from peftlab.data.splits import load_splits
from peftlab.data.tasks import get_task
from peftlab.experiments.probe import probe_split
from peftlab.methods.registry import get_method
from peftlab.models.adapters import load_for_inference
from peftlab.prompts.encoding import format_for


def run_probe(run_dir: Path, limit: int | None = None) -> dict:
    """`peftlab probe RUN_DIR`: probe a finished run and add the probe's keys to its result.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise PeftlabError(f"{run_dir}: not a finished run folder (no result.json / config.yaml)")
    cfg = from_dict(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    if cfg.data.mixture:
        raise PeftlabError("the brittleness probe runs on single-task runs, not mixtures")
    if limit:
        cfg.experiments.probe_limit = limit
    task = get_task(cfg.data.task)
    trained = get_method(cfg.method.name).trains
    splits = load_splits(cfg, task, val_in_train=not trained)  # the demo pool the run itself had
    loaded, _ = load_for_inference(cfg.model.name, str(run_dir) if trained else None, cfg.model.device)
    fmt = format_for(loaded)  # a vision-language run keeps its images in the probe
    fmt.chat = loaded.chat if cfg.model.chat is None else cfg.model.chat
    metrics = probe_split(cfg, loaded.model, fmt, task, splits, run_dir)
    result = read_json(run_dir / "result.json")
    result["metrics"] = {**result.get("metrics", {}), **metrics}
    write_json(run_dir / "result.json", result)
    return metrics
