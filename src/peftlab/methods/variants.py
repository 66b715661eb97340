"""The named peft variants beyond LoRA, IA3 and prompt learning: DoRA, rsLoRA, PiSSA, OLoRA, VeRA, LoHa, LoKr, OFT,
BOFT, AdaLoRA, LN-tuning, HRA, FourierFT, MiSS, Lily, SHiRA and HiRA.

Each builder maps the shared `method.*` keys (`r`, `alpha`, `dropout`, `target_modules`) onto its peft config;
every other field of that config is set through `method.peft` (`methods.passthrough.with_extras`). Where a key
has no meaning for a tuner (OFT's rank is its block layout, LN-tuning targets norms, not projections), the builder
says so in its docstring and peft's own default holds.
"""

from __future__ import annotations

import dataclasses

import torch

from peftlab.core.config import MethodConfig
from peftlab.data.tasks import Task
from peftlab.methods.tuners import _lora, _target_modules, _task_type
from peftlab.models.hf_folder import LoadedModel

# AdaLoRA's config needs a total step count when it is built, but the count is known only once the loop has sized
# its batches; `methods.schedule.start_schedule` puts the run's count in before the first step.
ADALORA_PLACEHOLDER_STEPS = 1_000_000


def _lora_like(cfg: MethodConfig, loaded: LoadedModel, task: Task, **fields):
    return dataclasses.replace(_lora(cfg, loaded, task), **fields)


def _dora(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    return _lora_like(cfg, loaded, task, use_dora=True)


def _rslora(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    return _lora_like(cfg, loaded, task, use_rslora=True)


def _pissa(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """LoRA started from the weights' top singular vectors (exact SVD), the base keeping the residual."""
    return _lora_like(cfg, loaded, task, init_lora_weights="pissa")


def _olora(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """LoRA started from a QR decomposition of the weights, the base keeping the residual."""
    return _lora_like(cfg, loaded, task, init_lora_weights="olora")


def _adalora(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """`method.r` is the target average rank; each layer starts at 1.5x it and AdaLoRA prunes to the budget."""
    from peft import AdaLoraConfig

    return AdaLoraConfig(task_type=_task_type(loaded), target_r=cfg.r, init_r=max(cfg.r * 3 // 2, cfg.r + 1),
                         lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=_target_modules(cfg, loaded),
                         total_step=ADALORA_PLACEHOLDER_STEPS)


def _vera(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """`method.r` is the rank of the frozen shared random projections (VeRA's paper uses 256)."""
    from peft import VeraConfig

    return VeraConfig(task_type=_task_type(loaded), r=cfg.r, vera_dropout=cfg.dropout,
                      target_modules=_target_modules(cfg, loaded))


def _loha(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """LoHa's dropouts act on whole ranks or modules per forward, so they stay at peft's 0 unless set."""
    from peft import LoHaConfig

    return LoHaConfig(task_type=_task_type(loaded), r=cfg.r, alpha=cfg.alpha,
                      target_modules=_target_modules(cfg, loaded))


def _lokr(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    from peft import LoKrConfig

    return LoKrConfig(task_type=_task_type(loaded), r=cfg.r, alpha=cfg.alpha,
                      target_modules=_target_modules(cfg, loaded))


def _oft(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """OFT's size is its block layout (`method.peft.oft_block_size`, peft's default 32), not `method.r`."""
    from peft import OFTConfig

    return OFTConfig(task_type=_task_type(loaded), target_modules=_target_modules(cfg, loaded))


def _boft(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """BOFT's size is its butterfly layout (`method.peft.boft_block_size`, `boft_n_butterfly_factor`)."""
    from peft import BOFTConfig

    return BOFTConfig(task_type=_task_type(loaded), target_modules=_target_modules(cfg, loaded))


def _ln_tuning(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """The model's norm layers (peft's list for the architecture); `method.peft.target_modules` picks others."""
    from peft import LNTuningConfig

    return LNTuningConfig(task_type=_task_type(loaded))


def _hra(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """`method.r` Householder reflections per adapted weight."""
    from peft import HRAConfig

    return HRAConfig(task_type=_task_type(loaded), r=cfg.r, target_modules=_target_modules(cfg, loaded))


def _fourierft(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """1000 trained spectral coefficients per weight (peft's default), fewer where a weight has fewer entries."""
    from peft import FourierFTConfig

    targets = _target_modules(cfg, loaded)
    sizes = [m.weight.numel() for name, m in loaded.model.named_modules()
             if isinstance(m, torch.nn.Linear) and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)]
    return FourierFTConfig(task_type=_task_type(loaded), n_frequency=min([1000, *sizes]), target_modules=targets)


def _miss(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """`method.r` is MiSS's shard size (peft's default is 64)."""
    from peft import MissConfig

    return MissConfig(task_type=_task_type(loaded), r=cfg.r, miss_dropout=cfg.dropout,
                      target_modules=_target_modules(cfg, loaded))


def _lily(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """`method.r` is the rank of Lily's shared low-rank projectors; `method.peft` sets stride_A, num_B, scaling."""
    from peft import LilyConfig

    return LilyConfig(task_type=_task_type(loaded), r=cfg.r, target_modules=_target_modules(cfg, loaded))


def _shira(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    """`method.r` sets how many weights train: r * (rows + columns) per adapted matrix, at random positions."""
    from peft import ShiraConfig

    return ShiraConfig(task_type=_task_type(loaded), r=cfg.r, target_modules=_target_modules(cfg, loaded))


def _hira(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    from peft import HiraConfig

    return HiraConfig(task_type=_task_type(loaded), r=cfg.r, hira_dropout=cfg.dropout,
                      target_modules=_target_modules(cfg, loaded))
