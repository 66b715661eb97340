"""A finished run folder as a model: rebuild exactly what was trained, with the settings it was trained with.

The run's `config.yaml` names the method, whose entry reloads the trained model (`methods.saved.load_trained`),
and brings the rest: task and label set, template, max_length, few-shot demos and calibration. `peftlab eval RUN`,
`predict` and `probe` all start here, so a run scores new data the way it scored its own test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftlab.core.config import RunConfig
from peftlab.core.errors import PeftlabError
from peftlab.core.result import run_config
from peftlab.data.mixture import is_mixture
from peftlab.data.splits import load_splits
from peftlab.data.tasks import Task, task_for
from peftlab.methods.registry import Method, get_method
from peftlab.methods.saved import load_trained
from peftlab.models.hf_folder import LoadedModel
from peftlab.prompts.encoding import content_free_items, few_shot_demos, format_for
from peftlab.prompts.format import Encoded, PromptFormat


@dataclass
class SavedRun:
    """A trained run, loaded: `model` is what scores (a peft model, a full model, a linear head or the base)."""

    run_dir: Path
    cfg: RunConfig
    method: Method
    task: Task
    loaded: LoadedModel
    model: torch.nn.Module
    fmt: PromptFormat
    shots: list[tuple[str, str]] = field(default_factory=list)
    content_free: list[Encoded] = field(default_factory=list)  # calibration prompts, when the run calibrated


def load_run(run_dir: Path, device: str | None = None, cfg: RunConfig | None = None) -> SavedRun:
    """Rebuild a finished run: its model, task, prompt format, demos and calibration prompts.

    `cfg`: the run's config with settings a caller chose to change (default: the run's own, unchanged).
    """
    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    if is_mixture(cfg.data):
        raise PeftlabError(f"{run_dir}: a multi-task run is scored per task; load one of its tasks' data instead")
    method, task = get_method(cfg.method.name), task_for(cfg.data)
    loaded, model = load_trained(run_dir, method, task, cfg.model, cfg.method, cfg.train, device or cfg.model.device)
    fmt = format_for(loaded)
    run = SavedRun(run_dir, cfg, method, task, loaded, model, fmt)
    shots_k = method.shots(cfg.data.shots)
    if shots_k or cfg.data.calibrate:  # both come from the run's own train split, as in training
        train = load_splits(cfg.data, task, val_in_train=not method.trains)["train"]
        run.shots = few_shot_demos(task, train, shots_k, cfg.data.seed, cfg.data.template)
        run.content_free = content_free_items(cfg.data, task, fmt, train, run.shots)
    return run
