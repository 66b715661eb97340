"""The named peft variants beyond LoRA, IA3 and prompt learning: DoRA, rsLoRA, PiSSA, OLoRA, VeRA, LoHa, LoKr, OFT,
BOFT, AdaLoRA, LN-tuning, HRA, FourierFT, MiSS, Lily, SHiRA and HiRA.

Each builder maps the shared `method.*` keys (`r`, `alpha`, `dropout`, `target_modules`) onto its peft config;
every other field of that config is set through `method.peft` (`methods.passthrough.with_extras`). Where a key
has no meaning for a tuner (OFT's rank is its block layout, LN-tuning targets norms, not projections), the builder
says so in its docstring and peft's own default holds.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from peftlab.core.config import MethodConfig
from peftlab.data.tasks import Task
from peftlab.methods.tuners import lora_config, peft_task_type, target_names
from peftlab.models.hf_folder import LoadedModel

if TYPE_CHECKING:
    from peft import PeftConfig

# AdaLoRA's config needs a total step count when it is built, but the count is known only once the loop has sized
# its batches; `methods.schedule.start_schedule` puts the run's count in before the first step.
ADALORA_PLACEHOLDER_STEPS = 1_000_000


def _lora_like(cfg: MethodConfig, loaded: LoadedModel, task: Task, **fields) -> PeftConfig:
    return dataclasses.replace(lora_config(cfg, loaded, task), **fields)


def dora_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """LoRA with DoRA's magnitude/direction split."""
    return _lora_like(cfg, loaded, task, use_dora=True)


def rslora_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """LoRA scaled by alpha / sqrt(r)."""
    return _lora_like(cfg, loaded, task, use_rslora=True)


def pissa_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """LoRA started from the weights' top singular vectors (exact SVD), the base keeping the residual."""
    return _lora_like(cfg, loaded, task, init_lora_weights="pissa")


def olora_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """LoRA started from a QR decomposition of the weights, the base keeping the residual."""
    return _lora_like(cfg, loaded, task, init_lora_weights="olora")


def adalora_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """`method.r` is the target average rank; each layer starts at 1.5x it and AdaLoRA prunes to the budget."""
    from peft import AdaLoraConfig

    return AdaLoraConfig(task_type=peft_task_type(loaded), target_r=cfg.r, init_r=max(cfg.r * 3 // 2, cfg.r + 1),
                         lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_names(cfg, loaded),
                         total_step=ADALORA_PLACEHOLDER_STEPS)


def vera_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """`method.r` is the rank of the frozen shared random projections (VeRA's paper uses 256)."""
    from peft import VeraConfig

    return VeraConfig(task_type=peft_task_type(loaded), r=cfg.r, vera_dropout=cfg.dropout,
                      target_modules=target_names(cfg, loaded))


def loha_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """LoHa's dropouts act on whole ranks or modules per forward, so they stay at peft's 0 unless set."""
    from peft import LoHaConfig

    return LoHaConfig(task_type=peft_task_type(loaded), r=cfg.r, alpha=cfg.alpha,
                      target_modules=target_names(cfg, loaded))


def lokr_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """LoKr with `method.r` and `alpha`; its factorisation (`decompose_factor`, ...) through `method.peft`."""
    from peft import LoKrConfig

    return LoKrConfig(task_type=peft_task_type(loaded), r=cfg.r, alpha=cfg.alpha,
                      target_modules=target_names(cfg, loaded))


def oft_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """OFT's size is its block layout (`method.peft.oft_block_size`, peft's default 32), not `method.r`."""
    from peft import OFTConfig

    return OFTConfig(task_type=peft_task_type(loaded), target_modules=target_names(cfg, loaded))


def boft_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """BOFT's size is its butterfly layout (`method.peft.boft_block_size`, `boft_n_butterfly_factor`)."""
    from peft import BOFTConfig

    return BOFTConfig(task_type=peft_task_type(loaded), target_modules=target_names(cfg, loaded))


def ln_tuning_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """The model's norm layers (peft's list for the architecture); `method.peft.target_modules` picks others."""
    from peft import LNTuningConfig

    return LNTuningConfig(task_type=peft_task_type(loaded))


def hra_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """`method.r` Householder reflections per adapted weight."""
    from peft import HRAConfig

    return HRAConfig(task_type=peft_task_type(loaded), r=cfg.r, target_modules=target_names(cfg, loaded))


def fourierft_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """1000 trained spectral coefficients per weight (peft's default), fewer where a weight has fewer entries."""
    from peft import FourierFTConfig

    targets = target_names(cfg, loaded)
    sizes = [m.weight.numel() for name, m in loaded.model.named_modules()
             if isinstance(m, torch.nn.Linear) and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)]
    return FourierFTConfig(task_type=peft_task_type(loaded), n_frequency=min([1000, *sizes]), target_modules=targets)


def miss_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """`method.r` is MiSS's shard size (peft's default is 64)."""
    from peft import MissConfig

    return MissConfig(task_type=peft_task_type(loaded), r=cfg.r, miss_dropout=cfg.dropout,
                      target_modules=target_names(cfg, loaded))


def lily_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """`method.r` is the rank of Lily's shared low-rank projectors; `method.peft` sets stride_A, num_B, scaling."""
    from peft import LilyConfig

    return LilyConfig(task_type=peft_task_type(loaded), r=cfg.r, target_modules=target_names(cfg, loaded))


def shira_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """`method.r` sets how many weights train: r * (rows + columns) per adapted matrix, at random positions."""
    from peft import ShiraConfig

    return ShiraConfig(task_type=peft_task_type(loaded), r=cfg.r, target_modules=target_names(cfg, loaded))


def hira_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """HiRA: a rank-`method.r` update multiplied elementwise into the weight."""
    from peft import HiraConfig

    return HiraConfig(task_type=peft_task_type(loaded), r=cfg.r, hira_dropout=cfg.dropout,
                      target_modules=target_names(cfg, loaded))
