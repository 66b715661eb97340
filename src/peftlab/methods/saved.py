"""A finished run's trained model, rebuilt exactly as it was trained and scored.

Every method kind reloads through `load_trained`, as its entry's `Method.storage` says: a peft adapter (prompt
learning included) on the run's base, QLoRA's adapter on the base quantized the same way, a full fine-tune's own
model folder, the linear head (and its text heads) on the frozen base, and the prompting baselines on the base as
it is. `recipes.saved_run.load_run` adds what the run's config.yaml brings besides (task, demos, calibration).
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftlab.core.config import MethodConfig, ModelConfig, TrainConfig
from peftlab.data.tasks import Task
from peftlab.kernels.memory import fused_rmsnorm, lean_swiglu
from peftlab.methods.registry import Method, plain_path_reason, use_plain_path
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.loading import load_model


def load_trained(run_dir: Path, method: Method, task: Task, model_cfg: ModelConfig, method_cfg: MethodConfig,
                 train: TrainConfig, device: str) -> tuple[LoadedModel, torch.nn.Module]:
    """(the loaded base or full model, the module that scores) of the run in `run_dir`, trained by `method` with
    the run's `model`, `method` and `train` settings."""
    run_dir = Path(run_dir)
    if method.trains_base:  # a full fine-tune is a model folder of its own
        loaded = load_model(str(run_dir / method.storage.folder), device=device, chat=model_cfg.chat)
    else:
        quantize = method_cfg.quant if method.quantized else None
        loaded = load_model(model_cfg.name, device=device, chat=model_cfg.chat, allow_pickle=model_cfg.allow_pickle,
                            quantize=quantize)
    _same_forward(loaded.model, method, method_cfg, train)
    return loaded, method.storage.attach(loaded, task, method_cfg, run_dir)


def _same_forward(model: torch.nn.Module, method: Method, method_cfg: MethodConfig, train: TrainConfig) -> None:
    """The forward the run was scored with in training: the speed paths where its tuner keeps them (exact rewrites
    of the model's own modules), the plain peft forward where it ran without them."""
    plain = plain_path_reason(method, method_cfg)
    if plain is None:
        lean_swiglu(model)
        fused_rmsnorm(model)
    else:
        use_plain_path(model, plain, train)
