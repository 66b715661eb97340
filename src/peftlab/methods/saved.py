"""A finished run folder as a model: rebuild exactly what was trained, with the settings it was trained with.

Every method kind loads through `load_run`: a peft adapter (prompt learning included) on the run's base, QLoRA's
adapter on the base quantized the same way, a full fine-tune's own model folder, the linear head (and its text
heads) on the frozen base, and the prompting baselines on the base as it is. The run's `config.yaml` brings the
rest: task and label set, template, max_length, few-shot demos and calibration. `peftlab eval RUN`, `predict`,
`probe` and `serve` all start here, so a run scores new data the way it scored its own test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftlab.core.config import RunConfig, read_run_config
from peftlab.core.errors import PeftlabError
from peftlab.core.result import has_result
from peftlab.data.splits import load_splits
from peftlab.data.tasks import Task, task_for
from peftlab.kernels.memory import fused_rmsnorm, lean_swiglu
from peftlab.methods.head import load_head
from peftlab.methods.registry import Method, get_method, plain_path_reason, use_plain_path
from peftlab.models.adapters import load_adapter
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.loading import load_model
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


def run_config(run_dir: Path) -> RunConfig:
    """The config a finished run folder was trained with."""
    run_dir = Path(run_dir)
    if not has_result(run_dir) or not (run_dir / "config.yaml").is_file():
        raise PeftlabError(f"{run_dir}: not a finished run folder (no result.json / config.yaml)")
    return read_run_config(run_dir / "config.yaml")


def load_run(run_dir: Path, device: str | None = None, cfg: RunConfig | None = None) -> SavedRun:
    """Rebuild a finished run: its model, task, prompt format, demos and calibration prompts.

    `cfg`: the run's config with settings a caller chose to change (default: the run's own, unchanged).
    """
    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    if cfg.data.mixture or cfg.data.task.startswith("mix:"):
        raise PeftlabError(f"{run_dir}: a multi-task run is scored per task; load one of its tasks' data instead")
    method, task = get_method(cfg.method.name), task_for(cfg.data)
    loaded, model = _trained_model(run_dir, cfg, method, task, device or cfg.model.device)
    fmt = format_for(loaded)
    run = SavedRun(run_dir, cfg, method, task, loaded, model, fmt)
    shots_k = cfg.data.shots or (3 if method.name == "few-shot" else 0)
    if shots_k or cfg.data.calibrate:  # both come from the run's own train split, as in training
        train = load_splits(cfg, task, val_in_train=not method.trains)["train"]
        run.shots = few_shot_demos(task, train, shots_k, cfg.data.seed, cfg.data.template)
        run.content_free = content_free_items(cfg, task, fmt, train, run.shots)
    return run


def _trained_model(run_dir: Path, cfg: RunConfig, method: Method, task: Task, device: str):
    """(the loaded base or full model, the module that scores) for the run's method kind."""
    if method.trains_base:  # a full fine-tune is a model folder of its own
        loaded = load_model(str(run_dir / "model"), device=device, chat=cfg.model.chat)
        return loaded, _same_forward(loaded.model, cfg)
    quantize = cfg.method.quant if method.quantized else None
    loaded = load_model(cfg.model.name, device=device, chat=cfg.model.chat, allow_pickle=cfg.model.allow_pickle,
                        quantize=quantize)
    _same_forward(loaded.model, cfg)
    if method.build is not None:
        return loaded, load_head(loaded, task, cfg.method, run_dir)
    if not method.trains:
        return loaded, loaded.model
    return loaded, load_adapter(loaded, run_dir)


def _same_forward(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """The forward the run was scored with in training: the speed paths where its tuner keeps them (exact rewrites
    of the model's own modules), the plain peft forward where it ran without them."""
    plain = plain_path_reason(cfg.method)
    if plain is None:
        lean_swiglu(model)
        fused_rmsnorm(model)
    else:
        use_plain_path(model, plain, cfg.train)
    return model
