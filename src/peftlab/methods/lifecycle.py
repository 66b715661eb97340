"""What some tuners need around training, beyond their config: AdaLoRA's rank schedule follows the step count,
and PiSSA/OLoRA adapters are saved as plain LoRA so that they load on the untouched base.

- `start_schedule(model, optimizer, total_steps)`: the training loop calls it once its step count is known. For
  AdaLoRA it puts that count in the config and calls `update_and_allocate` after every optimizer step (peft's
  documented place: after `optimizer.step()`, before `zero_grad()`, while the gradients it scores by are there).
- `remember_initial(model)`: right after PiSSA/OLoRA initialised, keep the initial adapter; `save_adapter` then
  saves the trained one converted against it (rank 2r LoRA), the form `PeftModel.from_pretrained` reproduces on
  the original weights. Without it, the saved adapter would only fit the residual base held in memory.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from peftlab.core.errors import PeftlabError

WEIGHT_INITS = ("pissa", "olora")  # LoRA inits that rewrite the base weights (peft's `init_lora_weights`)
_INITIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> folder of its initial adapter


def _config(model: torch.nn.Module):
    configs = getattr(model, "peft_config", None)
    return configs.get("default") if isinstance(configs, dict) else None


def start_schedule(model: torch.nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
    """Give a tuner that schedules itself by step (AdaLoRA) the run's step count and its per-step call."""
    config = _config(model)
    if config is None or getattr(config.peft_type, "value", None) != "ADALORA":
        return
    config.total_step = total_steps
    if config.tinit >= total_steps - config.tfinal:
        raise PeftlabError(
            f"method.peft.tinit ({config.tinit}) + tfinal ({config.tfinal}) leave AdaLoRA no budgeting phase in "
            f"{total_steps} steps; lower them or train longer"
        )
    tuner = model.base_model

    def allocate(opt, args, kwargs) -> None:
        # AdamW counts its own steps, and a resumed run restores that count with the optimizer state.
        done = max((int(s["step"]) for s in opt.state.values() if "step" in s), default=1)
        tuner.update_and_allocate(done - 1)

    def keep_pruned(module, incompatible) -> None:
        # The loop reloads its best epoch's weights at the end; the final rank pattern must still hold for them,
        # since the adapter is saved pruned to it and the test predictions must be those of the saved adapter.
        if config.rank_pattern:
            tuner.rankallocator.mask_using_rank_pattern(tuner.model, config.rank_pattern)

    optimizer.register_step_post_hook(allocate)
    model.register_load_state_dict_post_hook(keep_pruned)


def remember_initial(model: torch.nn.Module) -> None:
    """Save a PiSSA/OLoRA model's freshly initialised adapter, for `save_adapter`'s conversion to plain LoRA."""
    config = _config(model)
    if config is None or not str(getattr(config, "init_lora_weights", "")).lower().startswith(WEIGHT_INITS):
        return
    folder = Path(tempfile.mkdtemp(prefix="peftlab-initial-"))
    atexit.register(shutil.rmtree, folder, True)
    init = config.init_lora_weights
    config.init_lora_weights = True  # loading it back must not run the SVD again on the residual base
    try:
        model.save_pretrained(folder / "initial", safe_serialization=True)
    finally:
        config.init_lora_weights = init
    _INITIAL[model] = folder / "initial"


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    """`save_pretrained`, converting a PiSSA/OLoRA adapter to the LoRA that fits the original base weights."""
    initial = _INITIAL.get(model)
    if initial is None:
        model.save_pretrained(out, safe_serialization=True)
        return
    model.save_pretrained(out, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial))
