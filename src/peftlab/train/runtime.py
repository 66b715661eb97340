"""Where a run executes: its device, dtype and mixed precision, and its seeds.

Every run goes through here (`recipes.train_run`), so single tasks and mixtures place and cast the model the same way.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from peftlab.core.config import RunConfig
from peftlab.models.device import parse_dtype, pick_device

if TYPE_CHECKING:
    import accelerate


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators: adapter init, shuffling and dropout repeat from the seed."""
    random.seed(seed)
    torch.manual_seed(seed)


def precision(cfg: RunConfig, method, device_type: str) -> tuple[torch.dtype | None, torch.dtype | None]:
    """The weights' dtype (None: the device's default) and the dtype training computes in under autocast (None: no
    autocast) for a run.

    bf16 weights are peftlab's GPU default, and adapters train well over them (peft keeps adapter weights in fp32).
    Full fine-tuning would update the bf16 weights themselves: an AdamW step at a fine-tuning learning rate is
    under half a bf16 ulp of most weights and rounds away (ten steps at lr 2e-5 changed 9% of a 576 x 576 matrix
    of 0.05-scale bf16 weights, by one ulp each). So on a GPU, with `model.dtype: auto`, full fine-tuning keeps
    fp32 weights and computes in bf16 autocast, as `transformers.Trainer`'s `bf16=True` does.
    """
    dtype = parse_dtype(cfg.model.dtype)
    mixed = cfg.train.mixed_precision
    if mixed == "auto":
        bf16_gpu = device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed = "bf16" if dtype is None and method.trains_base and bf16_gpu else "no"
    if mixed == "no":
        return dtype, None
    return dtype or torch.float32, torch.bfloat16  # the weights the optimizer updates stay fp32


def accelerator_and_dtype(cfg: RunConfig, method) -> tuple[accelerate.Accelerator, str, torch.dtype | None]:
    """The run's Accelerator, the device to load the model on, and the weights' dtype (see `precision`).

    Autocast is peftlab's own (`train.step.train_step`), not accelerate's `mixed_precision`: accelerate keeps that in a
    process-wide state, fixed by the first run, and one process trains many runs (cross-validation folds, a
    comparison's methods, a sweep's trials).
    """
    from accelerate import Accelerator

    dtype, _ = precision(cfg, method, pick_device(cfg.model.device).type)
    accelerator = Accelerator(cpu=cfg.model.device == "cpu", log_with=cfg.train.report_to or None,
                              project_dir=str(cfg.run_dir))
    return accelerator, str(accelerator.device) if cfg.model.device == "auto" else cfg.model.device, dtype
